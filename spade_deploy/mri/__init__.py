"""Accelerated multi-coil MRI (fastMRI): the task, its data, physics, metrics and models."""

from . import deq, task, varnet  # noqa: F401 (they register the task and its models)
