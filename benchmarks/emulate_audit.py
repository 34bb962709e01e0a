"""Which distributions a device run imported, against what the device has (benchmarks/emulate_device.sh).

``install()`` runs in every Python process of the emulated run (a ``sitecustomize`` on its path) and
writes, at exit, each top-level module it imported with the file it came from. ``python
emulate_audit.py AUDIT_DIR TREE`` then attributes them: the standard library, the project's tree,
the carried packages (``TREE/benchmarks/.gpu-site``) or an installed distribution (the one whose RECORD lists the
module's file), which must be one of ``benchmarks/device-packages.txt``; modules without a file
that are not built in were made at run time by loaded code and are listed as such. Exit status 1 when any is not, or cannot be attributed.
Standard library only: it is imported at the start of every process of the run.
"""

from __future__ import annotations

import atexit
import os
import sys

ENV = "SPADE_EMULATE_AUDIT"


def install() -> None:
    folder = os.environ.get(ENV)
    if folder:
        atexit.register(_dump, folder)


def _dump(folder: str) -> None:
    lines = []
    for name, module in list(sys.modules.items()):
        if "." in name or module is None:
            continue
        where = getattr(module, "__file__", None)
        if where is None:
            path = getattr(module, "__path__", None)  # a namespace package
            where = next(iter(path), None) if path is not None else None
        lines.append(f"{name}\t{where or ''}")
    try:
        with open(os.path.join(folder, f"{os.getpid()}.tsv"), "w") as fh:
            fh.write(" ".join(sys.argv[:3]).replace("\t", " ") + "\n" + "\n".join(lines) + "\n")
    except OSError:
        pass


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def device_packages(path: str) -> set[str]:
    names = set()
    for line in open(path):
        line = line.split("#")[0].strip()
        if line:
            names.add(_normalise(line.split("==")[0]))
    return names


def main(audit_dir: str, tree: str) -> int:
    from importlib.metadata import distributions

    owner = {}  # installed file -> its distribution (the RECORD of each)
    for dist in distributions():
        for f in dist.files or ():
            owner[os.path.realpath(dist.locate_file(f))] = _normalise(dist.metadata["Name"])
    tree = os.path.realpath(tree)
    site = os.path.join(tree, "benchmarks", ".gpu-site")
    device = device_packages(os.path.join(tree, "benchmarks", "device-packages.txt"))
    used: dict[str, set[str]] = {}  # attribution -> top-level modules
    processes = 0
    for entry in sorted(os.listdir(audit_dir)):
        processes += 1
        with open(os.path.join(audit_dir, entry)) as fh:
            fh.readline()  # the command line
            for line in fh:
                name, _, where = line.rstrip("\n").partition("\t")
                real = os.path.realpath(where) if where else ""
                if name in ("sitecustomize", "emulate_audit", "__main__", "__mp_main__"):
                    continue
                if real.startswith(site + os.sep):
                    kind = "carried: " + os.path.relpath(real, site).split(os.sep)[0]
                elif real.startswith(tree + os.sep):
                    kind = "project"
                elif name in sys.stdlib_module_names or name in sys.builtin_module_names or (
                        real and real.startswith(os.path.realpath(sys.base_prefix) + os.sep)):
                    kind = "stdlib"
                elif real in owner:
                    kind = owner[real]
                elif os.path.isdir(real) and (dists := {d for f, d in owner.items() if f.startswith(real + os.sep)}):
                    kind = " / ".join(sorted(dists))  # a namespace package: the distributions with files in it
                elif not where:  # made at run time by loaded code (Cython's cython_runtime, torch's generated modules)
                    kind = "no file"
                else:
                    kind = f"unattributed ({where})"
                used.setdefault(kind, set()).add(name)
    lacking = {k: v for k, v in used.items()
               if k not in ("project", "stdlib", "no file") and not k.startswith("carried: ")
               and not all(d.strip() in device for d in k.split(" / "))}
    print(f"{processes} Python processes audited; distributions imported:")
    for kind in sorted(used):
        mark = "  NOT ON THE DEVICE" if kind in lacking else ""
        mods = sorted(used[kind])
        print(f"  {kind}: {', '.join(mods[:8])}{' ...' if len(mods) > 8 else ''}{mark}")
    if lacking:
        print(f"imported but not on the device: {', '.join(sorted(lacking))}")
        return 1
    print("imported but not on the device: none")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: emulate_audit.py AUDIT_DIR TREE")
    sys.exit(main(sys.argv[1], sys.argv[2]))
