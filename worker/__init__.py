"""The worker: Celery tasks that score studies with `models`, build their SR/KOS and deliver them.

It stands on `core` and never imports `service`: the gateway and the worker meet through the database and
task names on the queue (core.contracts.Task).
"""
