"""The forensic science of btd: BTD diffusion models, DICOM preprocessing, scoring and evaluation.

This package knows nothing about networks, databases or queues, so it can be used on its own from
Python or from the `btd` command line.
"""

__version__ = "0.1.0"
