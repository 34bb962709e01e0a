"""The 12 blur kernels of USRNet's evaluation, shipped with the package, and user kernels.

``kernels_12.mat`` is the file ``kernels/kernels_12.mat`` of the official USRNet repository
(cszn/USRNet; Zhang, Van Gool, Timofte, "Deep unfolding network for image super-resolution",
CVPR 2020), unchanged: one MATLAB variable ``kernels``, a 1 x 12 cell of 25 x 25 float32 kernels,
each summing to one — 8 Gaussian kernels (isotropic, then anisotropic) then 4 motion kernels, in the
order the USRNet paper (Table 1) and the SPADE paper (Tables 4, 6) report them. The SPADE paper
evaluates USRNet with them at x2, x3 and x4.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import scipy.io

from ..errors import SpadeError
from .physics import check_kernel

N_GAUSSIAN, N_MOTION = 8, 4


def kernels_path() -> Path:
    return Path(str(resources.files(__package__).joinpath("kernels_12.mat")))


def kernel_names() -> list[str]:
    """``k1`` .. ``k12`` as in the papers' tables (1-8 Gaussian, 9-12 motion)."""
    return [f"k{i + 1}" for i in range(N_GAUSSIAN + N_MOTION)]


def kernel_kind(index: int) -> str:
    return "gaussian" if index < N_GAUSSIAN else "motion"


def paper_kernels() -> list[np.ndarray]:
    """The 12 kernels as float64 ``(25, 25)`` arrays (the official test casts them so)."""
    cell = scipy.io.loadmat(kernels_path())["kernels"]
    kernels = [np.asarray(cell[0, i], dtype=np.float64) for i in range(cell.shape[1])]
    for k in kernels:
        check_kernel(k)
    return kernels


def load_kernel(path: str | Path) -> np.ndarray:
    """A user's blur kernel: ``.npy`` (a 2-D array) or ``.mat`` (one 2-D numeric variable), checked
    (2-D, finite, normalised) and returned as float64."""
    path = Path(path)
    if not path.is_file():
        raise SpadeError(f"kernel file {path} not found")
    try:
        if path.suffix.lower() == ".npy":
            k = np.load(path, allow_pickle=False)
        elif path.suffix.lower() == ".mat":
            arrays = [v for n, v in scipy.io.loadmat(path).items() if not n.startswith("__") and isinstance(v, np.ndarray)
                      and v.dtype.kind in "fiu"]
            if len(arrays) != 1:
                raise SpadeError(f"{path} must hold exactly one numeric array (the kernel), found {len(arrays)}")
            k = arrays[0]
        else:
            raise SpadeError(f"kernel file {path} must be .npy or .mat")
    except SpadeError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt or unreadable file
        raise SpadeError(f"cannot read kernel {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if k.dtype.kind not in "fiu":
        raise SpadeError(f"kernel {path} is not numeric ({k.dtype})")
    return check_kernel(k).numpy()


def parse_kernels(specs: list[str]) -> dict[str, np.ndarray]:
    """Kernels named on the command line: ``k1`` .. ``k12`` (the papers') or ``.npy`` / ``.mat`` files
    (named by their stem), each checked (2-D, finite, normalised)."""
    paper = dict(zip(kernel_names(), paper_kernels()))
    return {k if k in paper else Path(k).stem: paper[k] if k in paper else load_kernel(k) for k in specs}
