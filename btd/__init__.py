"""The composition root of btd: the `btd` command line, which builds the pieces each process needs.

It is the only package that imports both faces: `btd serve` runs the gateway (`service`) and, without a
broker, hands the worker's task table (`worker.registry`) to the in-process executor; `btd worker` runs the
Celery worker (`worker`). It holds no logic of its own.
"""
