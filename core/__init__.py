"""The foundation both faces of btd stand on: settings, the database (schema, sessions, the state machine's
writes), the spool, task dispatch, the DICOM sender, observability, and the contracts module that names
everything two parts must agree on.

It serves neither HTTP nor DICOM and runs no model; it may read the `models` package's metadata (default
model, verdict names), never the other way round.
"""
