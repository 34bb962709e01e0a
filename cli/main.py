"""``spade``: prune, fine-tune, export and benchmark model-based deep learning reconstructors."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ._common import check_choice, check_device, check_number, check_sampling, check_solver, console, print_table, user_errors


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
CacheOpt = Annotated[Optional[Path], typer.Option("--cache-dir", help="Cache of estimated coil maps (default: $XDG_CACHE_HOME/spade-deploy or ~/.cache/spade-deploy; never the data folder).")]
CoilMapsOpt = Annotated[str, typer.Option("--coil-maps", help="espirit: estimated from each measurement's fully sampled centre (ACS) only | file: the file's sens_maps, a reference no scanner gives (e.g. the simulation's true maps).")]
ScaleOpt = Annotated[Optional[list[int]], typer.Option("--scale", help="Super-resolution: scale factor (repeatable; 1-4; default 2 3 4).")]
KernelOpt = Annotated[Optional[list[str]], typer.Option("--kernel", help="Super-resolution: blur kernel, k1..k12 (the papers' 12) or a .npy / .mat file of a 2-D kernel summing to one (repeatable; default the 12).")]
NoiseOpt = Annotated[float, typer.Option("--noise", help="Super-resolution: standard deviation of the white noise on the [0, 1] intensity scale (default 0, as the papers' tables).")]
CkptSecondsOpt = Annotated[float, typer.Option("--checkpoint-seconds", help="Write a resumable last.safetensors within an epoch after this many seconds (0: every step).")]
SPLITS = ("train", "val", "test")


def _data_folders(root: Path, splits=SPLITS) -> list[Path]:
    """The user's data folders, where nothing is ever written."""
    return [root / split for split in splits]


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


def _task(task_name: str, data: Path | None, **options):
    """The task ``task_name`` from the command line's ``--data`` and task options, and the root of
    its splits (the embedded MRI dataset is built on first use, with a progress bar)."""
    from spade_deploy.tasks import task_class

    task = task_class(task_name).from_cli(data, options)
    root = _dataset_root(data) if task_name == "mri" else task.data_root(data)
    return task, root


def _model_task(model: str, preset: str | None = None) -> str:
    from spade_deploy.models import build_model

    return build_model(model, preset=preset).task


def _checkpoint_task(checkpoint: Path) -> str:
    """The task of a checkpoint's model, from its manifest alone; a manifest naming no known model
    is left to the loader to refuse (with its own message): "mri" then, the commands' first path."""
    from spade_deploy.io import read_manifest
    from spade_deploy.models import model_names

    manifest = read_manifest(checkpoint)
    name = manifest.get("model") if isinstance(manifest, dict) else None
    return _model_task(name) if isinstance(name, str) and name in model_names() else "mri"


def _task_split(task, root, split: str):
    """A split of the task's data (one-line error when it is missing)."""
    from spade_deploy.errors import SpadeError

    check_choice("split", split, SPLITS)
    if not task.has_split(root, split):
        raise SpadeError(f"{root} has no {split}/ folder")
    return task.dataset(root, split)


def _split(root: Path, split: str, coil_maps: str = "espirit", cache_dir: Path | None = None):
    from spade_deploy import data as D
    from spade_deploy.errors import SpadeError

    check_choice("split", split, SPLITS)
    path = root / split
    if not path.is_dir():
        raise SpadeError(f"{root} has no {split}/ folder")
    return D.SliceDataset(path, coil_maps=coil_maps, cache_dir=cache_dir)  # type: ignore[arg-type]


@app.command()
@user_errors
def data(
    root: Annotated[Optional[Path], typer.Option("--root", help="Where to build (default: $SPADE_DATA or ./data/default).")] = None,
    seed: Annotated[int, typer.Option(help="Simulation seed (coils, phase, noise, contrasts).")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if a complete build exists.")] = False,
):
    """Build the embedded default dataset (real MNI brain template -> simulated multi-coil k-space)."""
    from spade_deploy import data as D

    check_number("--seed", seed, 0, 2**31 - 1)
    root = root or D.default_data_root()
    info = _build_default(root, seed=seed, force=force)
    table = Table(title=f"Embedded dataset at {root}")
    for col in ("split", "volumes", "slices", "coils", "size"):
        table.add_column(col)
    for split in ("train", "val", "test"):
        ds = D.SliceDataset(root / split)
        item = ds[0]
        table.add_row(split, str(len(ds.files)), str(len(ds)), str(item["kspace"].shape[0]), "x".join(map(str, item["kspace"].shape[-2:])))
    print_table(table)
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
    print_table(table)


@app.command()
@user_errors
def train(
    model: Annotated[str, typer.Option("--model", "-m", help="Registry name (see `spade models`).")] = "deq",
    preset: Annotated[Optional[str], typer.Option(help="Architecture preset (paper | small | tiny).")] = None,
    data: DataOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: best.safetensors, last.safetensors, history.json.")] = Path("runs/deq"),
    epochs: Annotated[int, typer.Option(help="Epochs (>= 1).")] = 5,
    lr: Annotated[float, typer.Option(help="Adam learning rate (fixed-point stage).")] = 2e-4,
    batch_size: Annotated[int, typer.Option(help="Slices per batch (>= 1).")] = 4,
    acceleration: AccelOpt = 6,
    center_fraction: CfOpt = None,
    lipschitz_weight: Annotated[float, typer.Option(help="DEQ: weight of the penalty keeping a Jacobian norm below its target (a contractive fixed point).")] = 10.0,
    lipschitz_target: Annotated[float, typer.Option(help="DEQ: the bound on that Jacobian norm.")] = 0.98,
    lipschitz_on: Annotated[str, typer.Option(help="DEQ: penalise the prior's Jacobian on a patch (prior) or the whole iteration's (operator).")] = "prior",
    train_max_iter: Annotated[int, typer.Option(help="DEQ: solver cap in training forward passes.")] = 50,
    train_tol: Annotated[float, typer.Option(help="DEQ: solver tolerance in training forward passes.")] = 1e-3,
    pretrain_steps: Annotated[int, typer.Option(help="DEQ: steps training the prior as a denoiser before the fixed-point training.")] = 800,
    pretrain_lr: Annotated[float, typer.Option(help="DEQ: learning rate of the denoiser pretraining.")] = 2e-3,
    seed: int = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.safetensors.")] = False,
    checkpoint_seconds: CkptSecondsOpt = 120.0,
    scale: ScaleOpt = None,
    kernel: KernelOpt = None,
    noise: NoiseOpt = 0.0,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="At most this many steps per epoch.")] = None,
):
    """Train a reconstructor (supervised) with a progress bar and per-epoch validation PSNR (the model's task: MRI or super-resolution)."""
    cfg = _train_config(
        epochs=epochs, lr=lr, batch_size=batch_size, acceleration=acceleration, center_fraction=center_fraction,
        seed=seed, lipschitz_weight=lipschitz_weight, lipschitz_target=lipschitz_target, lipschitz_on=lipschitz_on,
        train_max_iter=train_max_iter, train_tol=train_tol, pretrain_steps=pretrain_steps, pretrain_lr=pretrain_lr,
        max_steps_per_epoch=max_steps,
    )
    check_number("--checkpoint-seconds", checkpoint_seconds, 0, 1e7)
    task, root = _task(_model_task(model, preset), data, acceleration=acceleration, center_fraction=center_fraction,
                       scale=scale, kernel=kernel, noise=noise)
    _run_training(model, preset, root, out, cfg, resume, checkpoint_seconds, task=task)


def _train_config(**options):
    """A :class:`TrainConfig` from CLI options; a bad value is named as the option (``--lr``)."""
    from spade_deploy.errors import SpadeError
    from spade_deploy.train import TrainConfig

    try:
        return TrainConfig(**options)
    except SpadeError as exc:
        msg = str(exc)
        name = msg.split(" ", 1)[0]
        if name in options:
            msg = "--" + name.replace("_", "-") + msg[len(name):]
        raise SpadeError(msg) from None


def _run_training(model: str, preset: str | None, root: Path | None, out: Path, cfg, resume: bool = False,
                  checkpoint_seconds: float | None = 120.0, task=None):
    import dataclasses

    import torch

    from spade_deploy.io import write_json
    from spade_deploy.losses import SupervisedLoss
    from spade_deploy.models import build_model, count_parameters
    from spade_deploy.paths import check_outputs
    from spade_deploy.tasks import task_for
    from spade_deploy.train import RUN_FILES, fit
    from spade_deploy.zoo import dataset_key

    _check_out_dir(out)
    check_outputs(files=[out / f for f in RUN_FILES], folders=[out], inputs=[root] if root else [],
                  data=_data_folders(root) if root else [])
    torch.manual_seed(cfg.seed)  # the initial weights, reproducibly
    net = build_model(model, preset=preset)
    task = task if task is not None else task_for(net, cfg)
    train_ds, val_ds = _task_split(task, root, "train"), _task_split(task, root, "val")
    console.print(f"Training [bold]{model}[/] ({count_parameters(net):,} parameters) on {len(train_ds)} samples, validating on {len(val_ds)}.")
    t0 = time.perf_counter()
    with progress_bar() as bar:
        bar_task = bar.add_task("epoch 1", total=None, info="")
        last = {}

        def on_step(label, step, n, loss):
            bar.update(bar_task, description=label, completed=step, total=n,
                       info=f"loss {loss:.4f}" + (f" | val PSNR {last['val_psnr']:.2f} dB" if "val_psnr" in last else ""))

        def on_epoch(rec):
            last.update(rec)
            bar.console.print(
                f"epoch {rec['epoch']}: loss {rec['train_loss']:.4f}"
                + (f", val PSNR {rec['val_psnr']:.2f} dB, SSIM {rec['val_ssim']:.4f}" if "val_psnr" in rec else "")
                + (f", {rec['val_iterations']:.1f} iterations" if rec.get("val_iterations") else "")
                + (" (some slices hit the cap)" if rec.get("val_converged") is False else "")
            )

        result = fit(net, SupervisedLoss(), train_ds, val_ds, cfg, out, resume=resume,
                     extra_manifest={"data": str(root) if root else "embedded", "preset": preset,
                                     "dataset": dataset_key(root) if root else None,
                                     "task": {"name": task.name, **task.options()}},
                     on_step=on_step, on_epoch=on_epoch, checkpoint_seconds=checkpoint_seconds, task=task)
    write_json(Path(out) / "history.json", {"train_config": dataclasses.asdict(cfg), "history": result.history})
    console.print(f"best checkpoint: [cyan]{result.best_path}[/] (val PSNR {result.best_val_psnr:.2f} dB) in {time.perf_counter() - t0:.0f} s")
    return result


@app.command(name="import")
@user_errors
def import_(
    source: Annotated[Path, typer.Argument(help="A fastMRI VarNet checkpoint (a state dict .pt or a PyTorch-Lightning .ckpt), or an official USRNet state dict (usrnet.pth, usrnet_tiny.pth).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The spade checkpoint to write (.safetensors).")],
    model: Annotated[str, typer.Option("--model", "-m", help="e2e-varnet (learned coil maps) | varnet (given coil maps: the sensitivity network is dropped) | usrnet.")] = "e2e-varnet",
    preset: Annotated[Optional[str], typer.Option(help="Refuse a checkpoint whose architecture differs from this preset's.")] = None,
):
    """Convert a fastMRI or official USRNet checkpoint, unchanged, into a spade checkpoint (read with weights_only: nothing is executed)."""
    from spade_deploy.checkpoint import save_model
    from spade_deploy.errors import SpadeError
    from spade_deploy.models import count_parameters, preset_config
    from spade_deploy.paths import check_outputs

    if out.exists() and out.is_dir():
        raise SpadeError(f"output path {out} is a folder, expected a .safetensors file")
    check_outputs(files=[out], inputs=[source])
    expect = preset_config(model, preset) if preset else None
    if model == "usrnet":
        from spade_deploy.models.usrnet import load_official_checkpoint

        net, info = load_official_checkpoint(source, expect=expect)
        save_model(out, net, imported=info, preset=preset)
        cfg = net.cfg
        console.print(f"usrnet: {cfg.n_iter} iterations, ResUNet widths {list(cfg.nc)} x {cfg.nb} blocks, "
                      f"{count_parameters(net):,} parameters")
        console.print(f"written: [cyan]{out}[/]")
        return
    if model not in ("varnet", "e2e-varnet"):
        raise SpadeError(f"import reads fastMRI VarNet (varnet, e2e-varnet) or official USRNet (usrnet) checkpoints, not {model!r}")
    from spade_deploy.models.varnet import load_fastmri_checkpoint

    net, info = load_fastmri_checkpoint(source, model, expect=expect)
    save_model(out, net, imported=info, preset=preset)
    cfg = net.cfg
    console.print(f"{model}: {cfg.num_cascades} cascades, U-Nets of {cfg.chans} channels / {cfg.pools} pools, "
                  f"{count_parameters(net):,} parameters"
                  + (f"; {info['dropped_keys']} sensitivity-network tensors dropped (coil maps given)" if info["dropped_keys"] else ""))
    console.print(f"written: [cyan]{out}[/]")


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
    batch_size: Annotated[int, typer.Option(min=1, help="Slices reconstructed together (slices of one size; a folder may mix sizes).")] = 4,
    cache_dir: CacheOpt = None,
    coil_maps: CoilMapsOpt = "espirit",
    scale: ScaleOpt = None,
    kernel: KernelOpt = None,
    noise: NoiseOpt = 0.0,
):
    """MRI: fastMRI's PSNR / SSIM / NMSE against reconstruction_rss (as its evaluate() scores `spade reconstruct`'s output), beside zero-filled RSS. Super-resolution: USRNet's official PSNR / SSIM per scale and kernel, beside bicubic."""
    check_choice("--split", split, SPLITS)
    task_name = _checkpoint_task(checkpoint)
    if task_name != "mri":
        check_number("--batch-size", batch_size, 1, 4096)
        task, root = _task(task_name, data, scale=scale, kernel=kernel, noise=noise)
        _run_eval_task(checkpoint, task, root, split, json_out, batch_size)
        return
    check_sampling(acceleration, center_fraction)
    check_solver(max_iter, tol)
    if solver is not None:
        check_choice("--solver", solver, ("anderson", "fixed-point"))
    _run_eval(checkpoint, _dataset_root(data), split, acceleration, center_fraction, max_iter, tol, solver, json_out,
              batch_size=batch_size, cache_dir=cache_dir, coil_maps=coil_maps)


def _run_eval(checkpoint: Path, root: Path, split: str, acceleration: int, center_fraction=None,
              max_iter=None, tol=None, solver=None, json_out: Path | None = None, batch_size: int = 4,
              cache_dir: Path | None = None, coil_maps: str = "espirit"):
    import dataclasses

    from spade_deploy.checkpoint import load_model
    from spade_deploy.errors import SpadeError
    from spade_deploy.io import write_json
    from spade_deploy.paths import check_outputs
    from spade_deploy.tasks.mri import MRITask
    from spade_deploy.train import evaluate

    if json_out is not None:
        if json_out.is_dir():
            raise SpadeError(f"--json {json_out} is a folder, expected a file")
        check_outputs(files=[json_out], inputs=[checkpoint, root], data=_data_folders(root))
    net, manifest = load_model(checkpoint)
    solver_cfg = None
    if hasattr(net, "solver_cfg"):
        changes = {k: v for k, v in (("max_iter", max_iter), ("tol", tol), ("method", solver)) if v is not None}
        try:
            solver_cfg = dataclasses.replace(net.solver_cfg, **changes)
        except (ValueError, SpadeError) as exc:
            raise SpadeError(str(exc)) from None
    ds = _split(root, split, coil_maps, cache_dir)
    with progress_bar(transient=True) as bar:
        task = bar.add_task(f"reconstructing {split}", total=None, info="")
        res = evaluate(net, ds, MRITask(acceleration, center_fraction, coil_maps, cache_dir), solver=solver_cfg,
                       batch_size=batch_size,
                       on_batch=lambda i, n: bar.update(task, completed=i, total=n))
    maps = "estimated from the ACS block" if res.coil_maps == "espirit" else "the files' sens_maps (reference)"
    table = Table(title=f"{manifest['model']} on {split} ({res.n_slices} slices, acceleration {acceleration}; fastMRI's "
                        f"scores against reconstruction_rss; coil maps {maps})")
    cols = ["method", "PSNR (dB)", "SSIM", "NMSE"] + (["PSNR vs SENSE", "SSIM vs SENSE"] if res.psnr_sense is not None else [])
    for col in cols:
        table.add_column(col, justify="right")
    table.add_row("zero-filled (RSS)", f"{res.psnr_zero_filled:.2f}", f"{res.ssim_zero_filled:.4f}", f"{res.nmse_zero_filled:.4f}",
                  *(["", ""] if res.psnr_sense is not None else []))
    table.add_row(manifest["model"], f"{res.psnr:.2f}", f"{res.ssim:.4f}", f"{res.nmse:.4f}",
                  *([f"{res.psnr_sense:.2f}", f"{res.ssim_sense:.4f}"] if res.psnr_sense is not None else []))
    print_table(table)
    if res.mean_iterations is not None:
        console.print(
            f"fixed point: mean {res.mean_iterations:.1f} iterations, max relative residual {res.max_residual:.2e}, "
            + ("all slices converged" if res.all_converged else
               f"[red]{len(res.not_converged)} slices hit the iteration cap:[/] {', '.join(res.not_converged)}")
        )
    console.print(f"gain over zero-filled: {res.psnr - res.psnr_zero_filled:+.2f} dB; {res.seconds:.1f} s")
    if json_out:
        write_json(json_out, {"checkpoint": str(checkpoint), "split": split, "acceleration": acceleration,
                              "solver": dataclasses.asdict(solver_cfg) if solver_cfg else None, **res.as_dict()})
    return res


def _run_eval_task(checkpoint: Path, task, root, split: str, json_out: Path | None = None, batch_size: int = 4):
    """Evaluate on a task whose scores come per scale and kernel (super-resolution): one table per
    kernel set, a row per kernel, PSNR / SSIM of the model and of the baseline per scale."""
    from spade_deploy.checkpoint import load_model
    from spade_deploy.errors import SpadeError
    from spade_deploy.io import write_json
    from spade_deploy.paths import check_outputs
    from spade_deploy.train import evaluate

    if json_out is not None:
        if json_out.is_dir():
            raise SpadeError(f"--json {json_out} is a folder, expected a file")
        check_outputs(files=[json_out], inputs=[checkpoint, *([root] if root else [])],
                      data=_data_folders(root) if root else [])
    net, manifest = load_model(checkpoint)
    ds = _task_split(task, root, split)
    with progress_bar(transient=True) as bar:
        bar_task = bar.add_task(f"restoring {split}", total=None, info="")
        res = evaluate(net, ds, task, batch_size=batch_size, on_batch=lambda i, n: bar.update(bar_task, completed=i, total=n))
    scales = list(dict.fromkeys(r.scale for r in res.rows))
    table = Table(title=f"{manifest['model']} on {split} ({res.n_images} images; {task.scores_name}; "
                        f"{manifest['model']} / {task.baseline_name} PSNR (dB) and SSIM per scale)")
    table.add_column("kernel")
    for s in scales:
        table.add_column(f"x{s} PSNR", justify="right")
        table.add_column(f"x{s} SSIM", justify="right")
    kernels = list(dict.fromkeys(r.kernel for r in res.rows))
    for k in kernels:
        cells = []
        for s in scales:
            r = next((r for r in res.rows if r.scale == s and r.kernel == k), None)
            cells += ([f"{r.psnr:.2f} / {r.psnr_bicubic:.2f}", f"{r.ssim:.4f} / {r.ssim_bicubic:.4f}"] if r else ["–", "–"])
        table.add_row(k, *cells)
    means = res.by_scale()
    table.add_row("[bold]mean[/]", *[c for s in scales for c in (f"{means[s]['psnr']:.2f} / {means[s]['psnr_bicubic']:.2f}",
                                                                     f"{means[s]['ssim']:.4f} / {means[s]['ssim_bicubic']:.4f}")])
    print_table(table)
    console.print(f"mean over scales and kernels: {res.psnr:.2f} dB (gain over {task.baseline_name}: "
                  f"{res.psnr - res.psnr_baseline:+.2f} dB); {res.seconds:.1f} s")
    if json_out:
        write_json(json_out, {"checkpoint": str(checkpoint), "split": split, "task": {"name": task.name, **task.options()},
                              **res.as_dict()})
    return res


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's checkpoints and results.")] = Path("runs/demo"),
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Architectures to run (repeatable): deq, varnet, e2e-varnet, usrnet; one bench table per task.")] = None,
    retrain: Annotated[bool, typer.Option("--retrain", help="Train and fine-tune again even where finished runs exist.")] = False,
    backends: Annotated[Optional[list[str]], typer.Option("--backend", "-b", help="Back-ends to deploy every variant on (default auto: the engine measured fastest here; the unpruned model is always also timed in PyTorch).")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Interleaved timing rounds (every variant reconstructs every test slice once per round).")] = 3,
):
    """The main job on the embedded data: build it, train each model, prune, fine-tune, export, bench."""
    from spade_deploy.errors import SpadeError
    from spade_deploy.losses import STRATEGIES
    from spade_deploy.prune import PAPER_RATIOS
    from spade_deploy.train import DEMO_RECIPES

    check_number("--repeats", repeats, 1, 10_000)
    models = list(dict.fromkeys(model or ["deq"]))
    for name in models:
        if name not in DEMO_RECIPES:
            raise SpadeError(f"no demo recipe for {name!r}; choose from {', '.join(DEMO_RECIPES)}")
    t0 = time.perf_counter()
    groups: dict[str, tuple] = {}  # task -> (task, data root, models, checkpoints): one bench per task
    for name in models:
        recipe = DEMO_RECIPES[name]
        task_name = _model_task(name, recipe.preset)
        if task_name == "mri":
            task, root = _task(task_name, None, acceleration=recipe.train.acceleration,
                               center_fraction=recipe.train.center_fraction)
        else:
            task, root = _task(task_name, None, **recipe.task_options)
        own_task = None if task_name == "mri" else task  # MRI: the task each command derives from its config
        base_dir = out / name
        console.rule(f"{name}: train ({recipe.preset} preset)")
        best = _train_once(name, recipe.preset, root, base_dir / "base", recipe.train, retrain, task=own_task)
        if task_name == "mri":
            _run_eval(best, root, "test", recipe.train.acceleration, json_out=base_dir / "eval-test.json")
        else:
            _run_eval_task(best, task, root, "test", json_out=base_dir / "eval-test.json")
        console.rule(f"{name}: SPADE prune")
        ratios = list(recipe.ratios or PAPER_RATIOS)
        pruned = [p for p, _ in _run_prune(best, ratios, base_dir / "pruned")]
        if recipe.hardware_widths:
            # ... and at the largest ratio with the widths this device runs fastest (--round-to auto).
            pruned += [p for p, _ in _run_prune(best, [max(ratios)], base_dir / "pruned", round_to="auto")]
        console.rule(f"{name}: SPADE fine-tune")
        tuned = []
        for path in pruned:
            for strategy in STRATEGIES:
                ft_out = base_dir / "finetuned" / f"{path.stem}.{strategy}"
                ft_cfg = recipe.finetune[strategy]
                if retrain or not _finished(ft_out, ft_cfg):
                    resume = not retrain and _resumable(ft_out / "last.safetensors", ft_cfg)
                    _run_finetune(path, strategy, best, root, ft_out, ft_cfg, resume=resume, task=own_task)
                tuned.append(ft_out / "best.safetensors")
        group = groups.setdefault(task_name, (task, root, [], []))
        group[2].append(name)
        group[3].extend([best, *pruned, *tuned])
    for task_name, (task, root, names, checkpoints) in groups.items():
        console.rule("SPADE: export + bench" + (f" ({task_name})" if len(groups) > 1 else ""))
        _run_bench(checkpoints, list(backends or ["auto"]), out / "engines", root, "test",
                   DEMO_RECIPES[names[0]].train.acceleration, None, repeats=repeats, warmup=1, device="cpu",
                   out=out / "results", stem="bench-" + "+".join(names), task=None if task_name == "mri" else task,
                   time_unfinetuned=False)  # pruned models before fine-tuning: scored, not deployed
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s; results in [cyan]{out / 'results'}[/]")


def _train_once(model: str, preset: str, root: Path | None, run: Path, cfg, retrain: bool, task=None) -> Path:
    """Train unless a finished run with the same recipe exists; resume an interrupted one."""
    from spade_deploy.io import read_manifest

    from spade_deploy.zoo import bundled_base

    best = run / "best.safetensors"
    if not retrain and _finished(run, cfg) and read_manifest(best).get("preset") == preset:
        console.print(f"Reusing the trained base model [cyan]{best}[/] (--retrain to train again).")
        return best
    shipped = None if retrain or root is None else bundled_base(model, preset, root)
    if shipped is not None:
        console.print(f"Using the base model trained on this dataset and shipped with spade-deploy: [cyan]{shipped}[/] "
                      "(--retrain to train it here).")
        return shipped
    resume = not retrain and _resumable(run / "last.safetensors", cfg)
    _run_training(model, preset, root, run, cfg, resume=resume, task=task)
    return best


from spade_deploy.pipeline import (  # noqa: E402  (the library's bookkeeping, under the names the commands use)
    export_files as _export_files,
    export_stem as _export_stem,
    export_stems as _export_stems,
    finished as _finished,
    fresh_export as _fresh_export,
    resumable as _resumable,
    same_recipe as _same_recipe,  # noqa: F401  (tests)
)


@app.command()
@user_errors
def finetune(
    checkpoint: Annotated[Path, typer.Argument(help="The pruned model (from `spade prune`).")],
    strategy: Annotated[str, typer.Option("--strategy", "-s", help="supervised | school | self-supervised")] = "self-supervised",
    teacher: Annotated[Optional[Path], typer.Option(help="school: the unpruned model (default: the pruned model's parent).")] = None,
    data: DataOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default: next to the checkpoint).")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs (>= 1).")] = 5,
    lr: Annotated[float, typer.Option(help="Adam learning rate (the paper's 1e-5 by default).")] = 1e-5,
    batch_size: Annotated[int, typer.Option(help="Slices per batch (>= 1).")] = 4,
    acceleration: AccelOpt = 6,
    center_fraction: CfOpt = None,
    lipschitz_weight: Annotated[float, typer.Option(help="DEQ: weight of the penalty keeping the iteration's Jacobian norm below its target, so the pruned model converges in few iterations (0: off).")] = 1.0,
    lipschitz_target: Annotated[Optional[float], typer.Option(help="DEQ: the bound on that Jacobian norm (default: measured on the unpruned parent at its own fixed points, so the pruned model needs no more iterations).")] = None,
    seed: int = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.safetensors.")] = False,
    cache_dir: CacheOpt = None,
    checkpoint_seconds: CkptSecondsOpt = 120.0,
    scale: ScaleOpt = None,
    kernel: KernelOpt = None,
    noise: NoiseOpt = 0.0,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="At most this many steps per epoch.")] = None,
):
    """Fine-tune a pruned model: supervised (ground truth), school (teacher) or self-supervised (measurements only)."""
    cfg = _train_config(epochs=epochs, lr=lr, batch_size=batch_size, acceleration=acceleration,
                        center_fraction=center_fraction, seed=seed, lipschitz_weight=lipschitz_weight,
                        lipschitz_target=lipschitz_target, max_steps_per_epoch=max_steps)
    check_number("--checkpoint-seconds", checkpoint_seconds, 0, 1e7)
    from spade_deploy.losses import STRATEGIES

    check_choice("--strategy", strategy, tuple(STRATEGIES))
    out = out or checkpoint.parent / f"{checkpoint.stem}.{strategy}"
    task, root = _task(_checkpoint_task(checkpoint), data, acceleration=acceleration,
                       center_fraction=center_fraction, cache_dir=cache_dir, scale=scale, kernel=kernel, noise=noise)
    _run_finetune(checkpoint, strategy, teacher, root, out, cfg, resume, checkpoint_seconds,
                  cache_dir=cache_dir, task=task)


def _run_finetune(checkpoint: Path, strategy: str, teacher_path: Path | None, root: Path | None, out: Path, cfg,
                  resume=False, checkpoint_seconds: float | None = 120.0, cache_dir: Path | None = None, task=None):
    from spade_deploy.finetune import finetune_model
    from spade_deploy.paths import check_outputs
    from spade_deploy.train import RUN_FILES

    _check_out_dir(out)
    check_outputs(files=[out / f for f in RUN_FILES], folders=[out], inputs=[checkpoint, teacher_path, root],
                  data=_data_folders(root) if root else [])

    with progress_bar() as bar:
        bar_task = bar.add_task(f"{strategy} fine-tuning", total=None, info="")

        def on_step(label, step, n, loss):
            bar.update(bar_task, description=f"{strategy} {label}", completed=step, total=n, info=f"loss {loss:.4f}")

        def on_epoch(rec):
            if "val_psnr" in rec:
                bar.console.print(f"epoch {rec['epoch']}: loss {rec['train_loss']:.4f}, val PSNR {rec['val_psnr']:.2f} dB")

        result = finetune_model(checkpoint, strategy, root, out, cfg, teacher_path=teacher_path, resume=resume,
                                on_step=on_step, on_epoch=on_epoch, checkpoint_seconds=checkpoint_seconds,
                                cache_dir=cache_dir, task=task)
    console.print(f"fine-tuned ({strategy}): [cyan]{result.best_path}[/]")
    from spade_deploy.io import read_manifest

    c = read_manifest(result.best_path).get("contraction")
    if c:
        where = (f"measured on the unpruned parent {c['parent']} (median over {len(c['norms'])} slices, max {c['max']:.4f})"
                 if c.get("source") == "parent" else "given")
        console.print(f"contraction target ||J_T|| <= {c['target']:.4f}, {where}")
    return result


@app.command()
@user_errors
def reconstruct(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors checkpoint written by spade.")],
    source: Annotated[Path, typer.Argument(help="A fastMRI-format .h5 file or a folder of them.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the fastMRI-format reconstructions.")] = Path("reconstructions"),
    acceleration: AccelOpt = 6,
    center_fraction: CfOpt = None,
    batch_size: Annotated[int, typer.Option(help="Slices per batch (>= 1).")] = 4,
    backend: Annotated[str, typer.Option("--backend", "-b", help="auto (the engine measured fastest here for this data, recorded in the export manifest) | torch | onnxruntime | tensorrt.")] = "auto",
    engines: Annotated[Optional[Path], typer.Option(help="Folder of exported priors (exported on the fly when missing; default: the cache home's spade-deploy/engines, never the current folder).")] = None,
    full_fov: Annotated[bool, typer.Option("--full-fov", help="Keep the full field of view (default: crop to the header's recon size, as fastMRI does).")] = False,
    cache_dir: CacheOpt = None,
    coil_maps: CoilMapsOpt = "espirit",
    scale: ScaleOpt = None,
    kernel: KernelOpt = None,
    noise: NoiseOpt = 0.0,
):
    """MRI: reconstruct fastMRI-format files into fastMRI-format HDF5 (`reconstruction`, per-slice `iterations` / `converged` / `final_residual`), for fastMRI's evaluate.py. Super-resolution: SOURCE is a folder of low-resolution images (or one), degraded at one --scale with one --kernel; SR PNGs are written to OUT."""
    if engines is None:
        from spade_deploy.coilmaps import default_cache_dir

        engines = default_cache_dir() / "engines"
    if _checkpoint_task(checkpoint) == "sr":
        _run_restore(checkpoint, source, out, scale, kernel, noise, backend, engines)
        return
    from spade_deploy import data as D
    from spade_deploy.checkpoint import load_model
    from spade_deploy.errors import SpadeError
    from spade_deploy.paths import check_outputs
    from spade_deploy.physics import center_fraction_for
    from spade_deploy.reconstruct import reconstruct_files
    from spade_deploy.runtime import BACKENDS, deploy

    if backend not in BACKENDS:
        raise SpadeError(f"unknown back-end {backend!r}; choose from {', '.join(BACKENDS)}")
    check_sampling(acceleration, center_fraction)
    check_number("--batch-size", batch_size, 1, 4096)
    _check_out_dir(out)
    sources = D.SliceDataset(source).files
    check_outputs(files=[out / p.name for p in sources], folders=[out], inputs=[checkpoint, source, *sources],
                  data=[source if source.is_dir() else source.parent])
    net, _ = load_model(checkpoint)
    cf = center_fraction if center_fraction is not None else center_fraction_for(acceleration)
    if backend != "torch":
        shape = tuple(D.SliceDataset(source)[0]["kspace"].shape[-2:])  # the engine is chosen for this size
        mpath, sha = _export_for(checkpoint, net, engines, [backend], data=[source if source.is_dir() else source.parent])
        net = deploy(net, backend, mpath, "cpu", shape=shape, checkpoint_sha256=sha)
        if getattr(net, "engine_choice", None):
            console.print("priors on: " + ", ".join(sorted(set(net.engine_choice.values()))) + " (measured fastest here)")
    with progress_bar(transient=True) as bar:
        task = bar.add_task("reconstructing", total=None, info="")
        res = reconstruct_files(net, source, out, acceleration, cf, batch_size,
                                on_slice=lambda i, n: bar.update(task, completed=i, total=n), full_fov=full_fov,
                                coil_maps=coil_maps, cache_dir=cache_dir)  # type: ignore[arg-type]
    iters = f", mean {res.mean_iterations:.1f} fixed-point iterations" if res.mean_iterations is not None else ""
    console.print(f"{res.n_slices} slices in {len(res.outputs)} files written to [cyan]{out}[/]{iters}")
    if res.not_converged:
        console.print(f"[red]{len(res.not_converged)} slices hit the iteration cap (not converged):[/] "
                      f"{', '.join(res.not_converged)}")


def _run_restore(checkpoint: Path, source: Path, out: Path, scale, kernel, noise: float, backend: str, engines: Path):
    from spade_deploy.checkpoint import load_model
    from spade_deploy.errors import SpadeError
    from spade_deploy.paths import check_outputs
    from spade_deploy.runtime import BACKENDS, deploy
    from spade_deploy.sr.reconstruct import lr_images, read_lr, restore_folder
    from spade_deploy.sr.physics import SRPhysics, check_kernel, check_scale
    from spade_deploy.tasks.sr import parse_kernels

    if backend not in BACKENDS:
        raise SpadeError(f"unknown back-end {backend!r}; choose from {', '.join(BACKENDS)}")
    if len(scale or []) != 1 or len(kernel or []) != 1:
        raise SpadeError("super-resolution reconstruct needs the images' degradation: exactly one --scale and one --kernel")
    s = check_scale(scale[0])
    (name, k), = parse_kernels(kernel).items()
    k = check_kernel(k).numpy()
    _check_out_dir(out)
    paths = lr_images(source)
    folder = source if source.is_dir() else source.parent
    check_outputs(files=[out / f"{p.stem}.png" for p in paths], folders=[out], inputs=[checkpoint, source, *paths],
                  data=[folder])
    net, _ = load_model(checkpoint)
    if backend != "torch":
        y = read_lr(paths[0], s, k.shape)
        mpath, sha = _export_for(checkpoint, net, engines, [backend], data=[folder])
        net = deploy(net, backend, mpath, "cpu", sample=(y, SRPhysics(k, s, noise)), checkpoint_sha256=sha)
        if getattr(net, "engine_choice", None):
            console.print("priors on: " + ", ".join(sorted(set(net.engine_choice.values()))) + " (measured fastest here)")
    with progress_bar(transient=True) as bar:
        bar_task = bar.add_task("super-resolving", total=None, info="")
        res = restore_folder(net, source, out, s, k, noise,
                             on_image=lambda i, n: bar.update(bar_task, completed=i, total=n))
    console.print(f"{len(res.outputs)} images super-resolved x{s} (kernel {name}) into [cyan]{out}[/]")


@app.command()
@user_errors
def prune(
    checkpoint: Annotated[Path, typer.Argument(help="The trained, unpruned model.")],
    ratios: Annotated[Optional[list[float]], typer.Option("--ratio", "-r", help="Per-layer pruning ratio (repeatable); default 0.05 0.1 0.2 0.4.")] = None,
    round_to: Annotated[Optional[str], typer.Option(help="Widths: N keeps channel counts multiples of N; 'auto' keeps per layer group the width this device runs fastest per MAC near the paper's count (measured). Default: the paper's exact counts.")] = None,
    target_speedup: Annotated[Optional[float], typer.Option(help="Search the ratio whose measured prior latency is X times below the unpruned prior's (instead of --ratio).")] = None,
    size: Annotated[int, typer.Option(min=8, help="Input size (square) at which --round-to auto and --target-speedup measure (the embedded data's 160).")] = 160,
    device: Annotated[Optional[str], typer.Option(help="Device to measure on: cpu | cuda (default: cuda if visible, else cpu).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the pruned checkpoints (default: beside the input).")] = None,
):
    """SPADE: DepGraph groups, group-L1 ranking, per-layer ratio; a table of parameters and MACs."""
    from spade_deploy.errors import SpadeError
    from spade_deploy.prune import PAPER_RATIOS

    if target_speedup is not None and ratios:
        raise SpadeError("give either --ratio or --target-speedup, not both")
    _run_prune(checkpoint, list(ratios or PAPER_RATIOS), out or checkpoint.parent / "pruned", round_to,
               target_speedup=target_speedup, size=(size, size), device=device)


def _run_prune(checkpoint: Path, ratios: list[float], out: Path, round_to=None, target_speedup=None,
               size=(160, 160), device=None):
    from spade_deploy.prune import (check_ratio, check_widths, default_timer, prune_checkpoint, prune_to_speedup,
                                     pruned_name)

    from spade_deploy.paths import check_outputs

    round_to = check_widths(round_to)
    if target_speedup is None:
        ratios = [check_ratio(r) for r in ratios]
    names = ([pruned_name(checkpoint.stem, r, round_to) for r in ratios] if target_speedup is None
             else [pruned_name(checkpoint.stem, 0.0, round_to, target_speedup)])
    _check_out_dir(out)
    check_outputs(files=[out / n for n in names], folders=[out], inputs=[checkpoint])
    timer = default_timer(device) if (round_to == "auto" or target_speedup is not None) else None
    if target_speedup is not None:
        with console.status(f"searching the ratio for x{target_speedup:g} measured on {timer.device}"):
            results = [prune_to_speedup(checkpoint, target_speedup, out, round_to, timer=timer, size=size)]
    else:
        results = prune_checkpoint(checkpoint, ratios, out, round_to, timer=timer, measure_size=size)
    table = Table(title=f"SPADE pruning of {checkpoint}")
    for col in ("ratio", "widths", "prior", "params before", "params after", "removed", "MACs before", "MACs after", "checkpoint"):
        table.add_column(col, justify="right", overflow="fold")
    for path, rep in results:
        for p in rep.priors:
            table.add_row(f"{rep.ratio:.3g}", rep.widths, p.name, f"{p.params_before:,}", f"{p.params_after:,}",
                          f"{1 - p.params_after / p.params_before:.1%}", f"{p.macs_before / 1e6:,.1f} M",
                          f"{p.macs_after / 1e6:,.1f} M", path.name)
        table.add_row(f"{rep.ratio:.3g}", rep.widths, "[bold]total[/]", f"{rep.params_before:,}", f"{rep.params_after:,}",
                      f"{1 - rep.params_after / rep.params_before:.1%}", f"{rep.macs_before / 1e6:,.1f} M",
                      f"{rep.macs_after / 1e6:,.1f} M", "")
    print_table(table)
    console.print(f"MACs per prior call on a {results[0][1].example_size[0]}x{results[0][1].example_size[1]} input.")
    for path, rep in results:
        for p in rep.priors:
            changed = [g for g in p.groups if g.chosen != g.paper]
            if p.groups:
                console.print(f"{rep.ratio:g} {p.name}: widths measured on {rep.device} at {size[0]}x{size[1]}; "
                              f"{len(changed)} of {len(p.groups)} groups moved from the paper's count: "
                              + (", ".join(sorted({f'{g.paper} -> {g.chosen}' for g in changed})) or "none"))
        s = rep.speedup
        if s is not None:
            verdict = "reached" if s.reached else "NOT reached (within 10 %)"
            console.print(f"target x{s.target:g} {verdict}: ratio {s.ratio:.3g}, measured prior speed-up x{s.speedup:.2f} "
                          f"({s.unpruned_ms:.2f} -> {s.pruned_ms:.2f} ms on {s.device}, {s.input[0]}x{s.input[1]}), "
                          f"params {rep.params_after:,}, MACs {rep.macs_after / 1e6:,.1f} M")
    return results


@app.command()
@user_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A (pruned, fine-tuned) checkpoint.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for ONNX files, engines and the manifest.")] = Path("engines"),
    onnx_: Annotated[bool, typer.Option("--onnx", help="Export ONNX: always done (TensorRT engines are built from it).")] = True,
    trt: Annotated[bool, typer.Option("--trt", help="Also build TensorRT engines (needs TensorRT and a GPU).")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="TensorRT engines in FP16 (with --trt).")] = False,
    size: Annotated[Optional[str], typer.Option("--size", help="With --trt: the slices' k-space size HxW (e.g. 160x160), the engines' profile.")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (17 up to the newest the installed onnx and torch support).")] = 17,
):
    """Export every prior to ONNX (checked against PyTorch) and, with --trt, to TensorRT engines."""
    from spade_deploy.errors import SpadeError
    from spade_deploy.export import check_opset

    check_opset(opset)
    if fp16 and not trt:
        raise SpadeError("--fp16 sets the precision of TensorRT engines: add --trt (ONNX files stay FP32)")
    if size is not None and not trt:
        raise SpadeError("--size sets the TensorRT engines' profile: add --trt")
    hw = None
    if size is not None:
        try:
            hw = tuple(int(v) for v in size.lower().split("x"))
        except ValueError:
            hw = ()
        if len(hw) != 2 or min(hw) < 1:
            raise SpadeError(f"--size {size!r}: expected HxW, e.g. 160x160")
    _run_export(checkpoint, out, trt=trt, fp16=fp16, opset=opset, size=hw)


def _export_for(checkpoint: Path, net, engines: Path, backends, size=None, data=()) -> tuple[Path, str]:
    """The export manifest of ``checkpoint`` for ``backends`` (exported first unless an intact export
    of exactly this checkpoint exists) and the checkpoint's SHA-256 it is bound to."""
    from spade_deploy.paths import check_outputs, sha256_file

    stem = _export_stem(checkpoint)
    sha = sha256_file(checkpoint)
    _check_out_dir(engines)
    check_outputs(files=_export_files(net, engines, stem), folders=[engines], inputs=[checkpoint], data=data)
    mpath = _fresh_export(net, sha, engines, stem, backends, size=size)
    if mpath is None:
        mpath = _run_export(checkpoint, engines, trt="tensorrt" in backends, quiet=True, stem=stem, size=size).manifest_path
    return mpath, sha


def _run_export(checkpoint: Path, out: Path, trt: bool = False, fp16: bool = False, opset: int = 17, quiet: bool = False,
                stem: str | None = None, size=None):
    from spade_deploy.checkpoint import load_model
    from spade_deploy.errors import SpadeError
    from spade_deploy.export import build_trt_engines, check_opset, export_onnx
    from spade_deploy.paths import check_outputs, sha256_file

    check_opset(opset)
    _check_out_dir(out)
    if trt:  # fail before writing anything when TensorRT cannot run here
        from spade_deploy.export import require_tensorrt

        require_tensorrt()
        if size is None:
            raise SpadeError("--trt needs --size HxW: the slices' k-space size, which the engines' profile is built for")
    net, manifest = load_model(checkpoint)
    stem = stem or _export_stem(checkpoint)
    check_outputs(files=_export_files(net, out, stem), folders=[out], inputs=[checkpoint])
    res = export_onnx(net, out, stem, opset=opset, source=str(checkpoint),
                      extra={"checkpoint_sha256": sha256_file(checkpoint), "pruning": manifest.get("pruning"),
                             "finetune": manifest.get("finetune")})
    if trt:
        build_trt_engines(res.manifest_path, net, size, fp16=fp16)
    if not quiet:
        table = Table(title=f"Exported {checkpoint.name}")
        for col in ("prior", "ONNX", "parameters", "max rel. error vs PyTorch"):
            table.add_column(col, justify="right")
        for p in res.priors:
            table.add_row(p.name, p.onnx, f"{p.params:,}", f"{p.max_rel_error:.2e}")
        print_table(table)
        console.print(f"manifest: [cyan]{res.manifest_path}[/]")
    return res


@app.command()
@user_errors
def bench(
    checkpoints: Annotated[list[Path], typer.Argument(help="The unpruned model and any pruned / fine-tuned ones.")],
    backend: Annotated[Optional[list[str]], typer.Option("--backend", "-b", help="auto | torch | onnxruntime | tensorrt (repeatable; default auto: the engine measured fastest on this device at the data's size, recorded in the export manifest).")] = None,
    engines: Annotated[Path, typer.Option(help="Folder of exported priors (exported on the fly when missing).")] = Path("engines"),
    data: DataOpt = None,
    split: Annotated[str, typer.Option(help="Split scored for quality.")] = "test",
    acceleration: AccelOpt = 6,
    center_fraction: CfOpt = None,
    repeats: Annotated[int, typer.Option(help="Interleaved timing rounds: each reconstructs every test slice once per variant (per-slice median over rounds, mean over slices).")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed reconstructions first (>= 0).")] = 1,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for JSON / CSV / Markdown / PNG results.")] = Path("benchmarks/results"),
    cache_dir: CacheOpt = None,
    coil_maps: CoilMapsOpt = "espirit",
    scale: ScaleOpt = None,
    kernel: KernelOpt = None,
    noise: NoiseOpt = 0.0,
):
    """Score and time the unpruned model and its pruned / fine-tuned variants on every back-end (MRI: fastMRI's scores; super-resolution: USRNet's, over --scale x --kernel)."""
    check_choice("--split", split, SPLITS)
    check_sampling(acceleration, center_fraction)
    check_number("--repeats", repeats, 1, 10_000)
    check_number("--warmup", warmup, 0, 10_000)
    check_device(device)
    task, root = _task(_checkpoint_task(checkpoints[0]) if checkpoints else "mri", data, acceleration=acceleration,
                       center_fraction=center_fraction, coil_maps=coil_maps, cache_dir=cache_dir, scale=scale,
                       kernel=kernel, noise=noise)
    _run_bench(checkpoints, list(backend or ["auto"]), engines, root, split,
               acceleration, center_fraction, repeats, warmup, device, out, cache_dir=cache_dir, coil_maps=coil_maps,
               task=task)


def _run_bench(checkpoints, backends, engines: Path, root: Path | None, split: str, acceleration: int, center_fraction,
               repeats: int, warmup: int, device: str, out: Path, stem: str = "bench", cache_dir: Path | None = None,
               coil_maps: str = "espirit", task=None, time_unfinetuned: bool = True):
    from spade_deploy import bench as B
    from spade_deploy.errors import SpadeError
    from spade_deploy.paths import check_outputs, sha256_file
    from spade_deploy.pipeline import bench_variant
    from spade_deploy.runtime import BACKENDS, deploy
    from spade_deploy.tasks.mri import MRITask

    for b in backends:
        if b not in BACKENDS:
            raise SpadeError(f"unknown back-end {b!r}; choose from {', '.join(BACKENDS)}")
    from spade_deploy.device import require_device

    dev = require_device(device)
    if "tensorrt" in backends:
        if dev.type != "cuda":
            raise SpadeError("-b tensorrt runs on a CUDA GPU: add --device cuda")
        from spade_deploy.export import require_tensorrt

        require_tensorrt()
    _check_out_dir(out)
    _check_out_dir(engines)
    results = [out / f"{stem}.{ext}" for ext in ("json", "csv", "md")] + [out / f"{stem}-degradation.png"]
    check_outputs(files=results, folders=[out, engines], inputs=[*checkpoints, root],
                  data=_data_folders(root, [split]) if root else [])
    task_ = task if task is not None else MRITask(acceleration, center_fraction, coil_maps, cache_dir)
    test_ds = _task_split(task_, root, split)  # a missing split fails before any export is written
    trt_size = task_.prior_size(test_ds) if "tensorrt" in backends else None
    variants, manifests, hashes, to_export = [], {}, {}, []
    stems = _export_stems(checkpoints)
    for path in checkpoints:
        variant, man = bench_variant(path)
        variant.timed = time_unfinetuned or variant.strategy != "none"
        net, label = variant.model, variant.label
        if not man.get("pruning") and any(v.label == label and v.ratio == 0 for v in variants):
            raise SpadeError(f"two unpruned {label!r} models given; bench one unpruned model per architecture")
        variants.append(variant)
        check_outputs(files=[out / f"{stem}-{label}-examples.png"], inputs=checkpoints)
        if any(b != "torch" for b in backends):
            # Read and check every existing export before anything is written.
            hashes[id(net)] = sha256_file(path)
            check_outputs(files=_export_files(net, engines, stems[path]), inputs=checkpoints)
            fresh = _fresh_export(net, hashes[id(net)], engines, stems[path], backends, size=trt_size)
            if fresh is None:
                to_export.append((path, net))
            else:
                manifests[id(net)] = fresh
    for label in {v.label for v in variants}:
        if not any(v.label == label and v.ratio == 0 for v in variants):
            raise SpadeError(f"bench needs the unpruned {label!r} among the checkpoints (speed-ups are relative to it)")
    for path, net in to_export:
        manifests[id(net)] = _run_export(path, engines, trt="tensorrt" in backends, quiet=True, stem=stems[path],
                                         size=trt_size).manifest_path
    deployers = {b: (lambda v, sample, b=b: deploy(v.model, b, manifests.get(id(v.model)), device, sample=sample,
                                             checkpoint_sha256=hashes.get(id(v.model))))
                 for b in backends}
    with progress_bar(transient=True) as bar:
        task = bar.add_task("benchmarking", total=None, info="")
        result = B.run_bench(variants, deployers, test_ds, task_, repeats=repeats, warmup=warmup,
                             device=device, on_progress=lambda what, i, n: bar.update(task, completed=i, total=n, description=what))
    opts = ", ".join(f"{k} {v}" for k, v in task_.options().items() if not isinstance(v, list) or len(v) < 4)
    table = Table(title=f"SPADE benchmark on {result.device} ({split}, {opts}; {result.baseline} PSNR {result.psnr_baseline:.2f} dB)")
    for col in B.COLUMNS:
        table.add_column(col, justify="right", no_wrap=True)
    for row in B.table_rows(result):
        table.add_row(*row)
    print_table(table)
    console.print(B.AGGREGATION + "; speed-ups against the unpruned PyTorch model; efficiency = per-iteration "
                  "speed-up / MAC ratio; on cap = slices stopped by the iteration cap.", soft_wrap=True)
    paths = B.write_results(result, out, stem)
    if any(v.strategy for v in variants):
        paths["degradation"] = B.plot_degradation(result, out / f"{stem}-degradation.png", backend=backends[0])
        for label in dict.fromkeys(v.label for v in variants):
            mine = [v for v in variants if v.label == label]
            if any(v.ratio > 0 for v in mine):
                paths[f"examples {label}"] = B.plot_examples(mine, test_ds, task_,
                                                             out / f"{stem}-{label}-examples.png")
    console.print("results: " + ", ".join(f"[cyan]{p}[/]" for p in paths.values()))
    return result


def main() -> None:
    """The ``spade`` command: a malformed command line (an option value of the wrong type, an
    unknown option, a missing argument) is one ``error:`` line and exit status 1, like every other
    bad input, not click's usage block."""
    try:  # typer >= 0.2x runs on its own copy of click
        from typer._click.exceptions import UsageError
    except ImportError:  # pragma: no cover - older typer
        from click.exceptions import UsageError

    from ._common import err_console

    try:
        code = app(standalone_mode=False)
    except UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx is not None else "spade"
        err_console.print(f"[bold red]error:[/] {cmd}: {' '.join(exc.format_message().split())} (see --help)",
                          highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.Abort:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
