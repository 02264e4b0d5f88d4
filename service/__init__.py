"""The hospital-facing gateway: DICOM in and out, the study database, the REST API and the `btd` CLI."""

__version__ = "0.1.0"
