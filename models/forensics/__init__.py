"""Tampering simulation and the forensic benchmark."""
