"""Shared fixtures: small fastMRI-format HDF5 files and a tiny simulated default dataset."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest

from spade_deploy.mri.simulate import DatasetInfo, SimConfig, build_default_dataset

# The auto back-end measures its candidate engines; torch.compile takes ~20 s per prior to compile on
# a 2-core CPU, so the suite's auto runs choose between eager PyTorch and onnxruntime (the tests of
# the selection itself name their engines). Set for the session whatever the user's setting.
# The precision auto picks is measured too (a bf16 -> FP32 schedule changes iteration counts), so the
# suite deploys in FP32 unless a test asks for a precision (tests/test_precision.py does).
SESSION_ENV = {"SPADE_AUTO_ENGINES": "torch,onnxruntime", "SPADE_PRECISION": "fp32"}
# A user's settings that change what the library computes or reads: unset for the session (the
# tests that are about them set them).
CLEARED_ENV = ("SPADE_HOST_ALLOCATOR", "SPADE_DATA", "SPADE_KILL_AT", "SPADE_NAN_AT", "SPADE_CHECK_RANKS",
               "SPADE_MAPS_CACHE_SIZE",
               # a torchrun job's own variables: inherited, they would shard reconstructions or join a job
               "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# Where the tests' processes (this one and the commands it starts) would write outside their own
# folders: home, caches, temporary files, compile caches. Each points into the session's temp folder.
ISOLATED_DIRS = ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "TMPDIR", "TMP",
                 "TEMP", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "MPLCONFIGDIR", "NUMBA_CACHE_DIR",
                 "TORCH_HOME", "CUDA_CACHE_PATH")


HEADER = (
    '<?xml version="1.0" encoding="utf-8"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>'
    "<encodedSpace><matrixSize><x>16</x><y>20</y><z>1</z></matrixSize></encodedSpace>"
    "<reconSpace><matrixSize><x>16</x><y>20</y><z>1</z></matrixSize></reconSpace>"
    "<encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>19</maximum><center>10</center>"
    "</kspace_encoding_step_1></encodingLimits><trajectory>cartesian</trajectory></encoding></ismrmrdHeader>"
)


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory: pytest.TempPathFactory):
    """For the session, restored after: home, caches and temp folder (of this process and of the
    commands the tests start) in pytest's temp folder, not the user's; the user's settings of the
    library removed, the suite's set."""
    base = tmp_path_factory.mktemp("env")
    with pytest.MonkeyPatch.context() as mp:
        for name in CLEARED_ENV:
            mp.delenv(name, raising=False)
        for name, value in SESSION_ENV.items():
            mp.setenv(name, value)
        for name in ISOLATED_DIRS:
            folder = base / name.lower()
            folder.mkdir()
            mp.setenv(name, str(folder))
        mp.setattr(tempfile, "tempdir", os.environ["TMPDIR"])
        yield


def _crandn(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


@pytest.fixture()
def make_fastmri_file(tmp_path: Path) -> Callable[..., tuple[Path, dict[str, np.ndarray]]]:
    """Factory: write a small fastMRI multi-coil file and return ``(path, arrays written)``.

    ``rss`` / ``smaps`` / ``max_attr`` switch the optional parts; any array passed in
    ``overrides`` (e.g. ``kspace=...``) replaces the generated one.
    """

    def make(
        name: str = "vol.h5",
        slices: int = 3,
        coils: int = 4,
        shape: tuple[int, int] = (16, 20),
        rss: bool = True,
        smaps: bool = True,
        max_attr: bool = True,
        seed: int = 0,
        folder: Path | None = None,
        **overrides: np.ndarray,
    ) -> tuple[Path, dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        arrays: dict[str, np.ndarray] = {"kspace": _crandn(rng, (slices, coils, *shape))}
        if rss:
            arrays["reconstruction_rss"] = rng.uniform(0, 1, (slices, *shape)).astype(np.float32)
        if smaps:
            s = _crandn(rng, (slices, coils, *shape))
            arrays["sens_maps"] = (s / np.sqrt((np.abs(s) ** 2).sum(1, keepdims=True))).astype(np.complex64)
        arrays.update(overrides)
        path = (folder or tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            for key, value in arrays.items():
                f[key] = value
            f["ismrmrd_header"] = np.bytes_(HEADER)
            if max_attr:
                f.attrs["max"] = 2.5
        return path, arrays

    return make


# Small enough for a few seconds on two CPU cores; real template, all code paths of the builder.
TINY = SimConfig(
    train_volumes=2, train_slices=2, val_volumes=1, val_slices=1, test_volumes=1, test_slices=2, size=48, n_coils=8
)


@pytest.fixture(scope="session")
def tiny_config() -> SimConfig:
    return TINY


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> DatasetInfo:
    """The default dataset built with tiny counts (seed 0), shared by the tests that only read it."""
    return build_default_dataset(tmp_path_factory.mktemp("sim") / "default", seed=0, config=TINY)
