"""Celery tasks that score studies with `models` and build and deliver their reports."""
