"""DICOM networking shared by both faces: the C-STORE sender and the destinations reports go to."""
