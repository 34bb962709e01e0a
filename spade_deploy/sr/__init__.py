"""Image super-resolution: the physics ``A = S H`` (blur + s-fold downsampling) with USRNet's
closed-form data step, the 12 test kernels, the official degradation and metrics, and the data."""

from . import task, usrnet  # noqa: F401 (they register the task and its model)
