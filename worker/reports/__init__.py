"""DICOM reports sent back to the PACS: the Structured Report and the Key Object Selection."""
