"""The project's import graph: rooms (modules), arrows (imports between them), circles, and the
arrows that run back up the layers.

Read with Python's ``ast`` from ``spade_deploy/`` and ``cli/`` (nothing is imported or run), both
the imports at the top of a module and those inside its functions. A module's layer is 1 + the
highest layer of the modules it imports at its top (0 for one importing none; the modules of a
circle share one layer). An arrow runs back up when it goes to a module of the same or a higher
layer than its own (only an import inside a function, or one inside a circle, can). A circle is a
set of two or more modules that reach each other through arrows of either kind.

Checks the layout's rules and prints each violation: the generic core (``spade_deploy/`` outside
the task packages) imports nothing under ``spade_deploy/mri/`` or ``spade_deploy/sr/`` (the
command layer ``cli/`` is counted apart); ``spade_deploy/deploy/`` imports no training,
fine-tuning, pruning or pipeline module.

    python benchmarks/import_graph.py            # figures and violations
    python benchmarks/import_graph.py --arrows   # also every arrow, with its kind and layers
    python benchmarks/import_graph.py --root DIR # another checkout (e.g. a git worktree)

Exits 1 when a rule is broken or a circle exists, so it can guard a change.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

# Top-level packages scanned: import name -> folder (the `spade` CLI installs cli/ as spade_deploy.cli).
PACKAGES = {"spade_deploy": "spade_deploy", "spade_deploy.cli": "cli"}
TASK_PACKAGES = ("spade_deploy.mri", "spade_deploy.sr")
DEPLOY_PACKAGE = "spade_deploy.deploy"
TRAINING = ("spade_deploy.train", "spade_deploy.finetune", "spade_deploy.prune", "spade_deploy.pipeline")


def module_files(root: Path) -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = path
    return mods


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` is, or lies in (``a.b.func`` -> ``a.b``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(mod: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """``[(module imported, at top level)]`` for one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = _resolve(alias.name, modules)
                    if target:
                        found.append((target, top))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    stem = ".".join(base + ([child.module] if child.module else []))
                else:
                    stem = child.module or ""
                for alias in child.names:  # `from pkg import module` imports the module
                    target = _resolve(f"{stem}.{alias.name}", modules) if f"{stem}.{alias.name}" in modules else None
                    target = target or _resolve(stem, modules)
                    if target:
                        found.append((target, top))
            visit(child, inner)

    visit(tree, True)
    return [(t, top) for t, top in found if t != mod]


def strongly_connected(nodes, edges) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in nodes:
        if v not in index:
            strong(v)
    return out


def analyse(root: Path) -> dict:
    modules = module_files(root)
    arrows: dict[tuple[str, str], bool] = {}  # (from, to) -> any import of it at top level
    lines_inside = 0
    for mod, path in modules.items():
        for target, top in imports(mod, path, modules):
            arrows[(mod, target)] = arrows.get((mod, target), False) or top
            lines_inside += not top
    every = {m: sorted({t for (f, t) in arrows if f == m}) for m in modules}
    top = {m: sorted({t for (f, t), tp in arrows.items() if f == m and tp}) for m in modules}
    circles = [c for c in strongly_connected(modules, every) if len(c) > 1]
    # Layers from the top-level imports, each circle of them counted as one module.
    comp_of = {}
    for comp in strongly_connected(modules, top):
        for m in comp:
            comp_of[m] = tuple(comp)
    layer: dict[tuple, int] = {}

    def layer_of(comp: tuple) -> int:
        if comp not in layer:
            layer[comp] = -1  # guard (cannot recurse into itself: the condensation is acyclic)
            deps = {comp_of[t] for m in comp for t in top[m]} - {comp}
            layer[comp] = 1 + max((layer_of(d) for d in deps), default=-1)
        return layer[comp]

    layers = {m: layer_of(comp_of[m]) for m in modules}
    back_up = sorted((f, t) for (f, t) in arrows if layers[t] >= layers[f])
    def in_task(m: str) -> bool:
        return any(m == p or m.startswith(p + ".") for p in TASK_PACKAGES)

    cli = [m for m in modules if m.startswith("spade_deploy.cli")]
    core = [m for m in modules if not in_task(m) and m not in cli]
    cli_to_task = sorted((f, t) for (f, t) in arrows if f in cli and in_task(t))
    core_to_task = sorted((f, t) for (f, t) in arrows if f in core and any(t == p or t.startswith(p + ".") for p in TASK_PACKAGES))
    deploy_to_training = sorted((f, t) for (f, t) in arrows
                                if (f == DEPLOY_PACKAGE or f.startswith(DEPLOY_PACKAGE + ".")) and t in TRAINING)
    return {"modules": modules, "arrows": arrows, "layers": layers, "circles": circles, "back_up": back_up,
            "inside_functions": lines_inside, "core_to_task": core_to_task, "cli_to_task": cli_to_task, "deploy_to_training": deploy_to_training}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="the checkout to read")
    ap.add_argument("--arrows", action="store_true", help="print every arrow")
    args = ap.parse_args(argv)
    g = analyse(args.root)
    arrows = g["arrows"]
    print(f"rooms (modules): {len(g['modules'])}")
    print(f"arrows (module -> module): {len(arrows)} ({sum(arrows.values())} with an import at the top of the module)")
    print(f"project imports inside functions: {g['inside_functions']}")
    print(f"layers: {max(g['layers'].values()) + 1}")
    print(f"circles: {len(g['circles'])}")
    for c in g["circles"]:
        print("  circle: " + " <-> ".join(c))
    print(f"arrows running back up: {len(g['back_up'])}")
    for f, t in g["back_up"]:
        print(f"  {f} (layer {g['layers'][f]}) -> {t} (layer {g['layers'][t]})")
    print(f"generic core -> task package (mri/, sr/): {len(g['core_to_task'])}")
    for f, t in g["core_to_task"]:
        print(f"  {f} -> {t}")
    print(f"cli/ -> task package (the command layer; not a rule): {len(g['cli_to_task'])}")
    for f, t in g["cli_to_task"]:
        print(f"  {f} -> {t}")
    print(f"deploy/ -> train / finetune / prune / pipeline: {len(g['deploy_to_training'])}")
    for f, t in g["deploy_to_training"]:
        print(f"  {f} -> {t}")
    if args.arrows:
        for (f, t), top in sorted(arrows.items()):
            print(f"{f} ({g['layers'][f]}) -> {t} ({g['layers'][t]}){'' if top else '  [inside a function]'}")
    return 1 if g["circles"] or g["core_to_task"] or g["deploy_to_training"] else 0


if __name__ == "__main__":
    sys.exit(main())
