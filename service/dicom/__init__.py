"""DICOM networking: the C-STORE/C-ECHO listener that receives studies and the C-STORE sender."""
