"""The host allocator setting the ``spade`` command runs with (spade_deploy.hostmem)."""

import ctypes.util
import os
import subprocess
import sys

import pytest

GLIBC = sys.platform.startswith("linux") and "libc.so" in (ctypes.util.find_library("c") or "libc.so.6")

PROBE = """
import sys
from spade_deploy import hostmem
before = hostmem.allocator_state()
print(before, hostmem.keep_freed_memory(), hostmem.keep_freed_memory(), hostmem.allocator_state())
"""


def _probe(**env) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_freed_memory_is_kept_unless_the_user_asks_for_the_system_allocator():
    env = {k: v for k, v in os.environ.items() if k != "SPADE_HOST_ALLOCATOR"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    # nothing changes on import; the setting applies once and is reported from then on
    assert out.stdout.split() == ["system", "kept", "kept", "kept"]
    assert _probe(SPADE_HOST_ALLOCATOR="system") == ["system", "system", "system", "system"]
    assert _probe(SPADE_HOST_ALLOCATOR=" System ") == ["system", "system", "system", "system"]


def test_the_spade_command_applies_it_before_any_command_runs(monkeypatch):
    from spade_deploy import hostmem
    from spade_deploy.cli import main as cli

    calls = []
    monkeypatch.setattr(hostmem, "keep_freed_memory", lambda: calls.append(1) or "kept")
    monkeypatch.setattr(sys, "argv", ["spade", "models"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 0 and calls == [1]


def test_a_misspelt_setting_is_a_one_line_error_of_the_spade_command():
    env = {**os.environ, "SPADE_HOST_ALLOCATOR": "sytem"}
    out = subprocess.run([sys.executable, "-m", "spade_deploy.cli.main", "models"], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "SPADE_HOST_ALLOCATOR" in lines[0] and "'sytem'" in lines[0], out.stderr
