"""The gateway's DICOM listener: its own upper layer (scp.py) and the C-STORE handler that stores instances."""
