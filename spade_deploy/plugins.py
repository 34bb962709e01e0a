"""The task packages. Each registers, on import, its task (:func:`spade_deploy.tasks.register_task`)
and its models (:func:`spade_deploy.models.register_model`); the generic core imports none of
them, and the two registries load them here, once, on first use. A third task is its package
and one line in :data:`TASK_PACKAGES`.
"""

from __future__ import annotations

import importlib

TASK_PACKAGES = ("spade_deploy.mri", "spade_deploy.sr")

_loaded = False


def load_task_packages() -> None:
    """Import every task package (their tasks and models register themselves)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for name in TASK_PACKAGES:
            importlib.import_module(name)
