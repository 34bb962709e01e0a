"""Multi-coil MRI at the scanner: ISMRMRD raw data in (files and the MRD streaming protocol),
MRD images and DICOM out, and ``spade serve``, the MRD streaming reconstruction server.

``ismrmrd_raw``: the ISMRMRD header, acquisitions assembled into per-slice k-space and mask,
ISMRMRD raw HDF5 files read slice by slice and written from fastMRI files (``spade convert``).
``mrd_stream``: the MRD v1 message framing over a socket. ``images``: MRD images of
reconstructions and MRD image files. ``dicom``: DICOM files of MRD images. ``server``: ``spade
serve``. ``client``: ``spade send``.
"""
