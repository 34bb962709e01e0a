"""Accelerated multi-coil MRI (fastMRI): the task, its data, physics, metrics and models."""
