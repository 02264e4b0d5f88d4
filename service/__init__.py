"""The gateway, the hospital-facing edge: the DICOM listener, the study stability monitor, the REST API and
the dashboard. It stands on `core` and never imports `worker`: the two meet through the database and the queue."""
