"""``spade``: prune, fine-tune, export and benchmark model-based deep learning reconstructors."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ._common import console, user_errors

# The demo's training recipe for the small DEQ on the embedded data (see README: convergence).
DEMO_EPOCHS = 15
DEMO_LR = 2e-3
DEMO_JACOBIAN_WEIGHT = 0.1

app = typer.Typer(
    name="spade",
    help="SPADE: structured pruning and deployment of model-based deep learning reconstructors.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Dataset root with train/ val/ test/ folders of fastMRI HDF5 files (default: the embedded dataset, built on first use).")]
AccelOpt = Annotated[int, typer.Option("--acceleration", "-a", help="Undersampling factor: 6, 8, 10 = the paper's 16.7 %, 12.5 %, 10 % sampling.")]
CfOpt = Annotated[Optional[float], typer.Option("--center-fraction", help="Fraction of auto-calibration lines (default per acceleration).")]


def progress_bar(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


def _dataset_root(data: Path | None) -> Path:
    """The user's root, or the embedded default (built on first use)."""
    from spade_deploy import data as D

    if data is not None:
        return data
    root = D.default_data_root()
    if not (root / "dataset.json").exists():
        console.print(f"Building the embedded default dataset in [cyan]{root}[/] …")
        _build_default(root, seed=0, force=False)
    return root


def _build_default(root: Path, seed: int, force: bool):
    from spade_deploy import data as D

    with progress_bar() as bar:
        task = bar.add_task("simulating k-space", total=None, info="")

        def cb(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return D.build_default_dataset(root, seed=seed, force=force, progress=cb)


def _check_out_dir(out: Path) -> None:
    from spade_deploy.errors import SpadeError

    if out.exists() and not out.is_dir():
        raise SpadeError(f"output path {out} is a file, expected a folder")


def _split(root: Path, split: str, coil_maps: str = "auto"):
    from spade_deploy import data as D
    from spade_deploy.errors import SpadeError

    path = root / split
    if not path.exists():
        raise SpadeError(f"{root} has no {split}/ folder")
    return D.SliceDataset(path, coil_maps=coil_maps)


@app.command()
@user_errors
def data(
    root: Annotated[Optional[Path], typer.Option("--root", help="Where to build (default: $SPADE_DATA or ./data/default).")] = None,
    seed: Annotated[int, typer.Option(help="Simulation seed (coils, phase, noise, contrasts).")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if a complete build exists.")] = False,
):
    """Build the embedded default dataset (real MNI brain template -> simulated multi-coil k-space)."""
    from spade_deploy import data as D

    root = root or D.default_data_root()
    info = _build_default(root, seed=seed, force=force)
    table = Table(title=f"Embedded dataset at {root}")
    for col in ("split", "volumes", "slices", "coils", "size"):
        table.add_column(col)
    for split in ("train", "val", "test"):
        ds = D.SliceDataset(root / split)
        item = ds[0]
        table.add_row(split, str(len(ds.files)), str(len(ds)), str(item["kspace"].shape[0]), "x".join(map(str, item["kspace"].shape[-2:])))
    console.print(table)
    console.print(str(root.resolve()))
    del info


@app.command()
@user_errors
def models():
    """List the reconstructors and their presets."""
    from spade_deploy.models import build_model, count_parameters, get_entry, model_names

    table = Table(title="Reconstructors")
    for col in ("model", "preset", "parameters", "priors"):
        table.add_column(col)
    for name in model_names():
        entry = get_entry(name)
        for preset in entry.presets:
            m = build_model(name, preset=preset)
            table.add_row(name, preset + (" (default)" if preset == entry.default_preset else ""), f"{count_parameters(m):,}", ", ".join(m.priors()))
    console.print(table)


@app.command()
@user_errors
def train(
    model: Annotated[str, typer.Option("--model", "-m", help="Registry name (see `spade models`).")] = "deq",
    preset: Annotated[Optional[str], typer.Option(help="Architecture preset (paper | small | tiny).")] = None,
    data: DataOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: best.safetensors, last.safetensors, history.json.")] = Path("runs/deq"),
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    acceleration: AccelOpt = 6,
    center_fraction: CfOpt = None,
    jacobian_weight: Annotated[float, typer.Option(help="DEQ: weight of the Jacobian penalty that keeps the fixed point contractive.")] = 1.0,
    train_max_iter: Annotated[int, typer.Option(help="DEQ: solver cap in training forward passes.")] = 50,
    train_tol: Annotated[float, typer.Option(help="DEQ: solver tolerance in training forward passes.")] = 1e-3,
    seed: int = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.safetensors.")] = False,
):
    """Train a reconstructor (supervised) with a progress bar and per-epoch validation PSNR."""
    from spade_deploy.train import TrainConfig

    cfg = TrainConfig(
        epochs=epochs, lr=lr, batch_size=batch_size, acceleration=acceleration, center_fraction=center_fraction,
        seed=seed, jacobian_weight=jacobian_weight, train_max_iter=train_max_iter, train_tol=train_tol,
    )
    _run_training(model, preset, _dataset_root(data), out, cfg, resume)


def _run_training(model: str, preset: str | None, root: Path, out: Path, cfg, resume: bool = False):
    import dataclasses

    from spade_deploy.io import write_json
    from spade_deploy.losses import SupervisedLoss
    from spade_deploy.models import build_model, count_parameters
    from spade_deploy.train import fit

    _check_out_dir(out)
    net = build_model(model, preset=preset)
    train_ds, val_ds = _split(root, "train"), _split(root, "val")
    console.print(f"Training [bold]{model}[/] ({count_parameters(net):,} parameters) on {len(train_ds)} slices, validating on {len(val_ds)}.")
    t0 = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("epoch 1", total=None, info="")
        last = {}

        def on_step(label, step, n, loss):
            bar.update(task, description=label, completed=step, total=n,
                       info=f"loss {loss:.4f}" + (f" | val PSNR {last['val_psnr']:.2f} dB" if "val_psnr" in last else ""))

        def on_epoch(rec):
            last.update(rec)
            bar.console.print(
                f"epoch {rec['epoch']}: loss {rec['train_loss']:.4f}"
                + (f", val PSNR {rec['val_psnr']:.2f} dB, SSIM {rec['val_ssim']:.4f}" if "val_psnr" in rec else "")
                + (f", {rec['val_iterations']:.1f} iterations" if rec.get("val_iterations") else "")
            )

        result = fit(net, SupervisedLoss(), train_ds, val_ds, cfg, out, resume=resume,
                     extra_manifest={"data": str(root), "preset": preset}, on_step=on_step, on_epoch=on_epoch)
    write_json(Path(out) / "history.json", {"train_config": dataclasses.asdict(cfg), "history": result.history})
    console.print(f"best checkpoint: [cyan]{result.best_path}[/] (val PSNR {result.best_val_psnr:.2f} dB) in {time.perf_counter() - t0:.0f} s")
    return result


@app.command(name="eval")
@user_errors
def eval_(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors checkpoint written by spade.")],
    data: DataOpt = None,
    split: Annotated[str, typer.Option(help="train | val | test")] = "test",
    acceleration: AccelOpt = 6,
    center_fraction: CfOpt = None,
    max_iter: Annotated[Optional[int], typer.Option(help="DEQ: iteration cap (default from the checkpoint: 100).")] = None,
    tol: Annotated[Optional[float], typer.Option(help="DEQ: relative-residual tolerance (default 1e-4).")] = None,
    solver: Annotated[Optional[str], typer.Option(help="DEQ: anderson | fixed-point.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON.")] = None,
):
    """PSNR / SSIM on a split (fastMRI's per-volume metrics), beside the zero-filled reconstruction."""
    _run_eval(checkpoint, _dataset_root(data), split, acceleration, center_fraction, max_iter, tol, solver, json_out)


def _run_eval(checkpoint: Path, root: Path, split: str, acceleration: int, center_fraction=None,
              max_iter=None, tol=None, solver=None, json_out: Path | None = None):
    import dataclasses

    from spade_deploy.checkpoint import load_model
    from spade_deploy.errors import SpadeError
    from spade_deploy.io import write_json
    from spade_deploy.train import evaluate

    net, manifest = load_model(checkpoint)
    solver_cfg = None
    if hasattr(net, "solver_cfg"):
        changes = {k: v for k, v in (("max_iter", max_iter), ("tol", tol), ("method", solver)) if v is not None}
        try:
            solver_cfg = dataclasses.replace(net.solver_cfg, **changes)
        except ValueError as exc:
            raise SpadeError(str(exc)) from None
    ds = _split(root, split)
    with progress_bar(transient=True) as bar:
        task = bar.add_task(f"reconstructing {split}", total=None, info="")
        res = evaluate(net, ds, acceleration, center_fraction, solver=solver_cfg,
                       on_batch=lambda i, n: bar.update(task, completed=i, total=n))
    table = Table(title=f"{manifest['model']} on {split} ({res.n_slices} slices, acceleration {acceleration})")
    for col in ("method", "PSNR (dB)", "SSIM"):
        table.add_column(col, justify="right")
    table.add_row("zero-filled", f"{res.psnr_zero_filled:.2f}", f"{res.ssim_zero_filled:.4f}")
    table.add_row(manifest["model"], f"{res.psnr:.2f}", f"{res.ssim:.4f}")
    console.print(table)
    if res.mean_iterations is not None:
        console.print(
            f"fixed point: mean {res.mean_iterations:.1f} iterations, max relative residual {res.max_residual:.2e}, "
            f"{'all slices converged' if res.all_converged else '[red]some slices hit the iteration cap[/]'}"
        )
    console.print(f"gain over zero-filled: {res.psnr - res.psnr_zero_filled:+.2f} dB; {res.seconds:.1f} s")
    if json_out:
        write_json(json_out, {"checkpoint": str(checkpoint), "split": split, "acceleration": acceleration,
                              "solver": dataclasses.asdict(solver_cfg) if solver_cfg else None, **res.as_dict()})
    return res


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's checkpoints and results.")] = Path("runs/demo"),
    preset: Annotated[str, typer.Option(help="DEQ preset to train.")] = "small",
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs for the base DEQ.")] = DEMO_EPOCHS,
    retrain: Annotated[bool, typer.Option("--retrain", help="Train again even if a finished base model exists.")] = False,
):
    """The main job on the embedded default data: build it, train (or reuse) the DEQ, evaluate on test."""
    from spade_deploy.io import read_manifest
    from spade_deploy.train import TrainConfig

    t0 = time.perf_counter()
    root = _dataset_root(None)
    run = out / f"deq-{preset}"
    cfg = TrainConfig(epochs=epochs, lr=DEMO_LR, jacobian_weight=DEMO_JACOBIAN_WEIGHT)
    best = run / "best.safetensors"
    finished = (run / "history.json").exists() and best.exists() and read_manifest(best).get("train_config") == dataclasses.asdict(cfg)
    if finished and not retrain:
        console.print(f"Reusing the trained base model [cyan]{best}[/] (--retrain to train again).")
    else:
        resume = (run / "last.safetensors").exists() and not retrain and _resumable(run / "last.safetensors", cfg)
        _run_training("deq", preset, root, run, cfg, resume=resume)
    res = _run_eval(best, root, "test", cfg.acceleration, json_out=out / "eval-test.json")
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s; results in [cyan]{out}[/]")
    return res


def _resumable(last: Path, cfg) -> bool:
    from spade_deploy.io import read_manifest

    ts = read_manifest(last).get("train_state") or {}
    return ts.get("train_config") == dataclasses.asdict(cfg) and ts.get("epoch", 0) < cfg.epochs


@app.command()
@user_errors
def finetune(
    checkpoint: Annotated[Path, typer.Argument(help="The pruned model (from `spade prune`).")],
    strategy: Annotated[str, typer.Option("--strategy", "-s", help="supervised | school | self-supervised")] = "self-supervised",
    teacher: Annotated[Optional[Path], typer.Option(help="school: the unpruned model (default: the pruned model's parent).")] = None,
    data: DataOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default: next to the checkpoint).")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 5,
    lr: Annotated[float, typer.Option(help="Adam learning rate (the paper's 1e-5 by default).")] = 1e-5,
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    acceleration: AccelOpt = 6,
    center_fraction: CfOpt = None,
    seed: int = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.safetensors.")] = False,
):
    """Fine-tune a pruned model: supervised (ground truth), school (teacher) or self-supervised (measurements only)."""
    from spade_deploy.train import TrainConfig

    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, acceleration=acceleration,
                      center_fraction=center_fraction, seed=seed)
    out = out or checkpoint.parent / f"{checkpoint.stem}.{strategy}"
    _run_finetune(checkpoint, strategy, teacher, _dataset_root(data), out, cfg, resume)


def _run_finetune(checkpoint: Path, strategy: str, teacher_path: Path | None, root: Path, out: Path, cfg, resume=False):
    from spade_deploy.finetune import finetune_model

    with progress_bar() as bar:
        task = bar.add_task(f"{strategy} fine-tuning", total=None, info="")

        def on_step(label, step, n, loss):
            bar.update(task, description=f"{strategy} {label}", completed=step, total=n, info=f"loss {loss:.4f}")

        def on_epoch(rec):
            if "val_psnr" in rec:
                bar.console.print(f"epoch {rec['epoch']}: loss {rec['train_loss']:.4f}, val PSNR {rec['val_psnr']:.2f} dB")

        result = finetune_model(checkpoint, strategy, root, out, cfg, teacher_path=teacher_path, resume=resume,
                                on_step=on_step, on_epoch=on_epoch)
    console.print(f"fine-tuned ({strategy}): [cyan]{result.best_path}[/]")
    return result


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
