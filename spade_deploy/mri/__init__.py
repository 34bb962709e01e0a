"""Accelerated multi-coil MRI (fastMRI): the task, its data, physics, metrics and models, and
MRI at the scanner: ISMRMRD raw data in (files and the MRD streaming protocol), MRD images and
DICOM out, and ``spade serve``, the MRD streaming reconstruction server.

``reader``: fastMRI and ISMRMRD raw files read slice by slice. ``acquisition``: the measurements
of a batch (masks, coil maps from the ACS block) and its operator. ``simulate``: the embedded
dataset simulated from a real brain template. ``coilmaps``: ESPIRiT and its cache.
``ismrmrd_raw``: the ISMRMRD header, acquisitions assembled into per-slice k-space and mask,
ISMRMRD raw HDF5 files read slice by slice and written. ``convert``: fastMRI files to ISMRMRD raw
files (``spade convert``). ``mrd_stream``: the MRD v1 message framing over a socket. ``images``:
MRD images of reconstructions and MRD image files. ``dicom``: DICOM files of MRD images.
``volumes``: a reconstructed file as MRD images or a DICOM series (``spade reconstruct --format``).
``server``: ``spade serve``. ``client``: ``spade send``.
"""

from . import deq, task, varnet  # noqa: F401 (they register the task and its models)
