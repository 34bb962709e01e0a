"""``spade``: prune, fine-tune, export and benchmark model-based deep learning reconstructors."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from spade_deploy import bench as B, hostmem
from spade_deploy.archive import parse_shard
from spade_deploy.checkpoint import load_model, save_model
from spade_deploy.demo import DemoReporter, run_demo
from spade_deploy.deploy.cache import export_checkpoint
from spade_deploy.deploy.export import check_opset
from spade_deploy.deploy.runtime import BACKENDS, default_precision
from spade_deploy.distributed import is_main
from spade_deploy.errors import SpadeError
from spade_deploy.io import read_manifest
from spade_deploy.losses import STRATEGIES
from spade_deploy.models import build_model, count_parameters, get_entry, model_names, preset_config
from spade_deploy.mri.task import MRITask
from spade_deploy.mri.client import send_file
from spade_deploy.mri.coilmaps import parse_size as parse_bytes
from spade_deploy.mri.convert import fastmri_to_raw
from spade_deploy.mri.heldout import heldout_report
from spade_deploy.mri.maps import build_maps
from spade_deploy.mri.physics import center_fraction_for
from spade_deploy.mri.server import ServeConfig, parse_size, serve as serve_mrd
from spade_deploy.paths import check_outputs
from spade_deploy.pipeline import (SPLITS, bench_checkpoints, evaluate_checkpoint, finetune_run,
                                   prune_run, train_run)
from spade_deploy.prune import PAPER_RATIOS
from spade_deploy.progress import Reporter
from spade_deploy.tasks import task_class
from spade_deploy.train import TrainConfig

from spade_deploy.options import check_choice, check_number
from spade_deploy.tasks import TableReport

from ._common import (check_device, check_sampling, check_solver, console, err_console, own_task_options, print_table,
                      user_errors, with_task_options)


app = typer.Typer(
    name="spade",
    help="SPADE: structured pruning and deployment of model-based deep learning reconstructors.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Dataset root with train/ val/ test/ folders of fastMRI HDF5 files (default: the embedded dataset, built on first use).")]
CfOpt = Annotated[Optional[float], typer.Option("--center-fraction", help="Fraction of auto-calibration lines (default per acceleration).")]
CkptSecondsOpt = Annotated[float, typer.Option("--checkpoint-seconds", help="Write a resumable last.safetensors within an epoch after this many seconds (0: every step).")]
LrScheduleOpt = Annotated[str, typer.Option("--lr-schedule", help="constant | cosine (decays --lr to 0 over the run's steps).")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="Loader processes reading the data (0: read in the command's own process).")]
TrainDeviceOpt = Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N (under torchrun, cuda is each process's own GPU: cuda:LOCAL_RANK).")]
RelativeToOpt = Annotated[str, typer.Option("--relative-to", help="Supervised: each sample's squared error over the reference's squared norm (reference) or over the naive reconstruction's squared error (baseline: super-resolution's bicubic).")]


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


class ConsoleReporter(DemoReporter):
    """The library's reports on the terminal: progress bars, lines, and for the demo the tables the
    single commands print."""

    def note(self, text: str) -> None:
        console.print(text, markup=False)

    def stage(self, title: str) -> None:
        console.rule(title)

    @contextlib.contextmanager
    def progress(self, description: str, transient: bool = False):
        with progress_bar(transient) as bar:
            task = bar.add_task(description, total=None, info="")

            def update(done, total=None, description=None, info=""):
                bar.update(task, completed=done, total=total, info=info,
                           **({"description": description} if description else {}))

            yield update

    def evaluated(self, evaluation) -> None:
        _show_eval(evaluation)

    def pruned(self, checkpoint, results, size) -> None:
        _show_prune(checkpoint, results, size)

    def benched(self, run) -> None:
        _show_bench(run)


def _task(task_name: str, data: Path | None, command: str, options: dict):
    """The task ``task_name`` from the command line's ``--data`` and the task options of
    ``command`` (:func:`own_task_options`), and the root of its splits (embedded data is built on
    first use, with a progress bar)."""
    task = task_class(task_name).from_cli(data, own_task_options(task_name, command, options))
    return task, task.data_root(data, ConsoleReporter())


def _show_table(report: TableReport) -> None:
    table = Table(title=report.title)
    for col, justify in zip(report.columns, report.justify):
        table.add_column(col, justify=justify)
    for row in report.rows:
        table.add_row(*row)
    print_table(table)
    for line in report.notes:
        console.print(line)


def _checkpoint_model(checkpoint: Path) -> str:
    """The registry name of a checkpoint's model, from its manifest alone (a one-line error for a
    manifest naming no known model)."""
    manifest = read_manifest(checkpoint)
    name = manifest.get("model") if isinstance(manifest, dict) else None
    if not isinstance(name, str) or name not in model_names():
        load_model(checkpoint)  # refuses it with the loader's own one-line message
        raise SpadeError(f"{checkpoint} names no known model (model {str(name)[:40]!r}); choose one of: "
                         f"{', '.join(model_names())}")
    return name


def _checkpoint_task(checkpoint: Path) -> str:
    """The task of a checkpoint's model (:func:`_checkpoint_model`)."""
    return get_entry(_checkpoint_model(checkpoint)).task


@app.command()
@user_errors
def data(
    root: Annotated[Optional[Path], typer.Option("--root", help="Where to build (default: $SPADE_DATA or ./data/default).")] = None,
    seed: Annotated[int, typer.Option(help="Simulation seed (coils, phase, noise, contrasts).")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if a complete build exists.")] = False,
    heldout: Annotated[bool, typer.Option("--heldout", help="Build instead, under --root/test, the held-out set: the same acquisition simulated from real MR images of other sources (nibabel's EPI brain series, matplotlib's sagittal head), for spade bench / eval --data ROOT.")] = False,
):
    """Build the embedded default dataset (real MNI brain template -> simulated multi-coil k-space), or with --heldout a held-out set of other real MR images."""
    check_number("--seed", seed, 0, 2**31 - 1)
    if heldout:
        if root is None:
            raise SpadeError("--heldout needs --root (a new or empty folder)")
        _show_table(heldout_report(root, seed=seed))
        return
    _show_table(MRITask().build_data(root, seed=seed, force=force, reporter=ConsoleReporter()))


@app.command()
@user_errors
def models():
    """List the reconstructors and their presets."""
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
@with_task_options("train")
def train(
    model: Annotated[str, typer.Option("--model", "-m", help="Registry name (see `spade models`).")] = "deq",
    preset: Annotated[Optional[str], typer.Option(help="Architecture preset (paper | small | tiny).")] = None,
    data: DataOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: best.safetensors, last.safetensors, history.json.")] = Path("runs/deq"),
    epochs: Annotated[int, typer.Option(help="Epochs (>= 1).")] = 5,
    lr: Annotated[float, typer.Option(help="Adam learning rate (fixed-point stage).")] = 2e-4,
    lr_schedule: LrScheduleOpt = "constant",
    relative_to: RelativeToOpt = "reference",
    batch_size: Annotated[int, typer.Option(help="Slices per batch (>= 1).")] = 4,
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
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="At most this many steps per epoch.")] = None,
    workers: WorkersOpt = 0,
    device: TrainDeviceOpt = "cpu",
    task_options: Optional[dict] = None,
):
    """Train a reconstructor (supervised) with a progress bar and per-epoch validation PSNR (the model's task: MRI or super-resolution)."""
    cfg = _train_config(
        model, dict(lipschitz_weight=lipschitz_weight, lipschitz_target=lipschitz_target, lipschitz_on=lipschitz_on,
                    train_max_iter=train_max_iter, train_tol=train_tol, pretrain_steps=pretrain_steps, pretrain_lr=pretrain_lr),
        epochs=epochs, lr=lr, lr_schedule=lr_schedule, relative_to=relative_to, batch_size=batch_size, seed=seed,
        max_steps_per_epoch=max_steps, device=check_device(device),
    )
    check_number("--checkpoint-seconds", checkpoint_seconds, 0, 1e7)
    task, root = _task(get_entry(model).task, data, "train", task_options)
    task.workers = check_number("--workers", workers, 0, 256)
    train_run(model, preset, root, out, cfg, task, resume, checkpoint_seconds, reporter=_rank_reporter())


def _rank_reporter():
    """The console for a plain run and for rank 0 of a torchrun job; the other ranks stay silent."""
    return ConsoleReporter() if is_main() else Reporter()


def _train_config(model: str, model_options: dict, **options):
    """A :class:`TrainConfig` for the registered ``model`` from CLI options; ``model_options`` are
    the options of the models that take their own (the DEQ's; ``ModelEntry.train_options``), which
    other models ignore. A bad value is named as the option (``--lr``)."""
    cls = get_entry(model).train_options
    try:
        return TrainConfig(**options, model_options=cls(**model_options) if cls is not None else None)
    except SpadeError as exc:
        msg = str(exc)
        name = msg.split(" ", 1)[0]
        if name in options or name in model_options:
            msg = "--" + name.replace("_", "-") + msg[len(name):]
        raise SpadeError(msg) from None


@app.command(name="import")
@user_errors
def import_(
    source: Annotated[Path, typer.Argument(help="A fastMRI VarNet checkpoint (a state dict .pt or a PyTorch-Lightning .ckpt), or an official USRNet state dict (usrnet.pth, usrnet_tiny.pth).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The spade checkpoint to write (.safetensors).")],
    model: Annotated[str, typer.Option("--model", "-m", help="e2e-varnet (learned coil maps) | varnet (given coil maps: the sensitivity network is dropped) | usrnet.")] = "e2e-varnet",
    preset: Annotated[Optional[str], typer.Option(help="Refuse a checkpoint whose architecture differs from this preset's.")] = None,
):
    """Convert a fastMRI or official USRNet checkpoint, unchanged, into a spade checkpoint (read with weights_only: nothing is executed)."""
    if out.exists() and out.is_dir():
        raise SpadeError(f"output path {out} is a folder, expected a .safetensors file")
    check_outputs(files=[out], inputs=[source])
    expect = preset_config(model, preset) if preset else None
    entry = get_entry(model)
    if entry.importer is None:
        readable = ", ".join(n for n in model_names() if get_entry(n).importer is not None)
        raise SpadeError(f"import reads official checkpoints of {readable}, not {model!r}")
    net, info, summary = entry.importer(source, model, expect)
    save_model(out, net, imported=info, preset=preset)
    console.print(summary)
    console.print(f"written: [cyan]{out}[/]")


@app.command(name="eval")
@user_errors
@with_task_options("eval")
def eval_(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors checkpoint written by spade.")],
    data: DataOpt = None,
    split: Annotated[str, typer.Option(help="train | val | test")] = "test",
    max_iter: Annotated[Optional[int], typer.Option(help="DEQ: iteration cap (default from the checkpoint: 100).")] = None,
    tol: Annotated[Optional[float], typer.Option(help="DEQ: relative-residual tolerance (default 1e-4).")] = None,
    solver: Annotated[Optional[str], typer.Option(help="DEQ: anderson | fixed-point.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Slices reconstructed together (slices of one size; a folder may mix sizes).")] = 4,
    workers: WorkersOpt = 0,
    task_options: Optional[dict] = None,
):
    """MRI: fastMRI's PSNR / SSIM / NMSE against reconstruction_rss (as its evaluate() scores `spade reconstruct`'s output), beside zero-filled RSS. Super-resolution: USRNet's official PSNR / SSIM per scale and kernel, beside bicubic."""
    check_choice("--split", split, SPLITS)
    check_number("--batch-size", batch_size, 1, 4096)
    check_solver(max_iter, tol)
    if solver is not None:
        check_choice("--solver", solver, ("anderson", "fixed-point"))
    task, root = _task(_checkpoint_task(checkpoint), data, "eval", task_options)
    task.workers = check_number("--workers", workers, 0, 256)
    _show_eval(evaluate_checkpoint(checkpoint, task, root, split, json_out, batch_size,
                                   solver_changes={"max_iter": max_iter, "tol": tol, "method": solver},
                                   reporter=ConsoleReporter()))


def _show_eval(ev) -> None:
    """The scores' table, as the task lays it out (:meth:`~spade_deploy.tasks.Task.score_table`)."""
    _show_table(ev.task.score_table(ev.scores, ev.model, ev.split))


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's checkpoints and results.")] = Path("runs/demo"),
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Architectures to run (repeatable): deq, varnet, e2e-varnet, usrnet; one bench table per task.")] = None,
    retrain: Annotated[bool, typer.Option("--retrain", help="Train and fine-tune again even where finished runs exist.")] = False,
    backends: Annotated[Optional[list[str]], typer.Option("--backend", "-b", help="Back-ends to deploy every variant on (default auto: the engine measured fastest here; the unpruned model is always also timed in PyTorch).")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Interleaved timing rounds (every variant reconstructs every test slice once per round; the first is also its scoring pass). 2 keeps the DEQ demo within a quarter hour on 2 cores; spade bench times 5 by default.")] = 2,
):
    """The main job on the embedded data: build it, train each model, prune, fine-tune, export, bench."""
    check_number("--repeats", repeats, 1, 10_000)
    result = run_demo(out, model or ["deq"], retrain=retrain, backends=backends or ["auto"], repeats=repeats,
                      reporter=ConsoleReporter())
    console.print(f"demo finished in {result.seconds:.0f} s; results in [cyan]{result.results}[/]")


@app.command()
@user_errors
@with_task_options("finetune")
def finetune(
    checkpoint: Annotated[Path, typer.Argument(help="The pruned model (from `spade prune`).")],
    strategy: Annotated[str, typer.Option("--strategy", "-s", help="supervised | school | self-supervised")] = "self-supervised",
    teacher: Annotated[Optional[Path], typer.Option(help="school: the unpruned model (default: the pruned model's parent).")] = None,
    data: DataOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default: next to the checkpoint).")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs (>= 1).")] = 5,
    lr: Annotated[float, typer.Option(help="Adam learning rate (the paper's 1e-5 by default).")] = 1e-5,
    lr_schedule: LrScheduleOpt = "constant",
    relative_to: RelativeToOpt = "reference",
    batch_size: Annotated[int, typer.Option(help="Slices per batch (>= 1).")] = 4,
    lipschitz_weight: Annotated[float, typer.Option(help="DEQ: weight of the penalty keeping the iteration's Jacobian norm below its target, so the pruned model converges in few iterations (0: off).")] = 1.0,
    lipschitz_target: Annotated[Optional[float], typer.Option(help="DEQ: the bound on that Jacobian norm (default: measured on the unpruned parent at its own fixed points, so the pruned model needs no more iterations).")] = None,
    seed: int = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.safetensors.")] = False,
    checkpoint_seconds: CkptSecondsOpt = 120.0,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="At most this many steps per epoch.")] = None,
    workers: WorkersOpt = 0,
    device: TrainDeviceOpt = "cpu",
    task_options: Optional[dict] = None,
):
    """Fine-tune a pruned model: supervised (ground truth), school (teacher) or self-supervised (measurements only)."""
    model = _checkpoint_model(checkpoint)
    cfg = _train_config(model, dict(lipschitz_weight=lipschitz_weight, lipschitz_target=lipschitz_target),
                        epochs=epochs, lr=lr, lr_schedule=lr_schedule, relative_to=relative_to, batch_size=batch_size,
                        seed=seed, max_steps_per_epoch=max_steps, device=check_device(device))
    check_number("--checkpoint-seconds", checkpoint_seconds, 0, 1e7)
    check_choice("--strategy", strategy, tuple(STRATEGIES))
    out = out or checkpoint.parent / f"{checkpoint.stem}.{strategy}"
    task, root = _task(get_entry(model).task, data, "finetune", task_options)
    task.workers = check_number("--workers", workers, 0, 256)
    finetune_run(checkpoint, strategy, teacher, root, out, cfg, task, resume, checkpoint_seconds,
                 reporter=_rank_reporter())


@app.command()
@user_errors
@with_task_options("reconstruct")
def reconstruct(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors checkpoint written by spade.")],
    source: Annotated[Path, typer.Argument(help="A fastMRI-format .h5 file or a folder of them.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the fastMRI-format reconstructions.")] = Path("reconstructions"),
    batch_size: Annotated[int, typer.Option(help="Slices per batch (>= 1).")] = 4,
    backend: Annotated[str, typer.Option("--backend", "-b", help="auto (the engine measured fastest here for this data, recorded in the export manifest) | torch | onnxruntime | tensorrt.")] = "auto",
    engines: Annotated[Optional[Path], typer.Option(help="Folder of exported priors (exported on the fly when missing; default: the cache home's spade-deploy/engines, never the current folder).")] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", help="R/N: this process's share of the inputs, balanced by slices (pixels for images); every process computes the same split (default: torchrun's RANK/WORLD_SIZE where set, else all).")] = None,
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="Skip an output that records the same checkpoint (SHA-256), settings and input (name, size, modification time); redo any other.")] = False,
    precision: Annotated[str, typer.Option("--precision", help="auto (fixed-point models with the auto back-end: a bf16->fp32 precision schedule where measured faster here, FP32 otherwise) | fp32 | bf16 | fp16 (a fixed-point model's schedule; unrolled models are refused).")] = "auto",
    task_options: Optional[dict] = None,
):
    """MRI: reconstruct fastMRI-format or ISMRMRD raw HDF5 files into fastMRI-format HDF5 (`reconstruction`, per-slice `iterations` / `converged` / `final_residual`, for fastMRI's evaluate.py), MRD images or DICOM. Super-resolution: SOURCE is a folder of low-resolution images (or one), degraded at one --scale with one --kernel; SR PNGs are written to OUT."""
    if backend not in BACKENDS:
        raise SpadeError(f"unknown back-end {backend!r}; choose from {', '.join(BACKENDS)}")
    check_number("--batch-size", batch_size, 1, 4096)
    name = _checkpoint_task(checkpoint)
    options = own_task_options(name, "reconstruct", task_options)
    task = task_class(name).from_cli(None, options)
    options = {**options, "shard": parse_shard(shard), "skip_existing": skip_existing}
    with default_precision(precision):
        for line in task.reconstruct(checkpoint, source, out, backend, engines, batch_size, options,
                                     reporter=ConsoleReporter()):
            console.print(line)


@app.command()
@user_errors
def maps(
    data: Annotated[Path, typer.Argument(help="A fastMRI-format or ISMRMRD raw .h5 file, or a folder of them.")],
    acceleration: Annotated[int, typer.Option("--acceleration", "-a", help="The sampling the maps are for: its default centre fraction (files with a mask: their own ACS block).")] = 6,
    center_fraction: Annotated[Optional[float], typer.Option(help="Fraction of auto-calibration lines (default per acceleration).")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Cache of estimated coil maps (default: $XDG_CACHE_HOME/spade-deploy or ~/.cache/spade-deploy; never the data folder).")] = None,
    cache_size: Annotated[Optional[str], typer.Option("--cache-size", help="The cache's budget (e.g. 200G; default $SPADE_MAPS_CACHE_SIZE, else 20G): least recently used maps are removed beyond it.")] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", help="R/N: this process's share of the files, balanced by slices (default: torchrun's RANK/WORLD_SIZE where set, else all).")] = None,
):
    """MRI: estimate the ESPIRiT coil maps of every slice under DATA into the coil-map cache ahead of a run (what eval, finetune, reconstruct and bench would estimate at this sampling)."""
    check_sampling(acceleration, center_fraction)
    budget, part = parse_bytes(cache_size, "--cache-size"), parse_shard(shard)
    cf = center_fraction if center_fraction is not None else center_fraction_for(acceleration)
    res = build_maps(data, cf, cache_dir, budget, part, reporter=ConsoleReporter())
    console.print(f"{res.slices} slices of {res.files} files{f' (shard {part})' if part.count > 1 else ''}: "
                  f"{res.computed} estimated, {res.slices - res.computed} already cached; the cache holds "
                  f"{res.usage.entries} maps, {res.usage.bytes / 2**20:,.1f} MiB of its {res.budget / 2**20:,.0f} MiB")


@app.command()
@user_errors
def serve(
    checkpoint: Annotated[Path, typer.Argument(help="An MRI checkpoint (pruned, fine-tuned) written by spade.")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface; the default takes local clients only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (9002: the open-source MRD servers' port; 0: any free port, named in the readiness line).")] = 9002,
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N")] = "cpu",
    backend: Annotated[str, typer.Option("--backend", "-b", help="auto (the engine measured fastest here, as spade reconstruct) | torch | onnxruntime | tensorrt.")] = "auto",
    coil_maps: Annotated[str, typer.Option("--coil-maps", help="espirit: maps estimated from each slice's calibration lines (a stream carries no others).")] = "espirit",
    engines: Annotated[Optional[Path], typer.Option(help="Folder of exported priors (default: the cache home's spade-deploy/engines).")] = None,
    size: Annotated[Optional[list[str]], typer.Option("--size", help="k-space size HxW (readout samples x lines) to deploy and warm up for at start (repeatable; default 160x160); other sizes are deployed on their first slice.")] = None,
    pixels: Annotated[str, typer.Option(help="Image pixels: uint16 (0..4095 per image, RescaleSlope in the meta attributes) | float32 (the magnitude itself).")] = "uint16",
    idle_timeout: Annotated[float, typer.Option(help="Seconds without data before a connection is dropped.")] = 300.0,
    max_connections: Annotated[int, typer.Option(help="Connections served at once (one thread each).")] = 16,
):
    """Serve reconstructions over the MRD (ISMRMRD) streaming protocol: raw acquisitions in, one MRD image per slice out as soon as it is done. Logs a readiness line; SIGTERM / SIGINT finish the slices in flight, then stop."""
    check_device(device)
    check_choice("--backend", backend, BACKENDS)
    if coil_maps != "espirit":
        raise SpadeError(f"--coil-maps {coil_maps}: an MRD stream carries no coil maps; the server estimates them "
                         "(espirit) from each slice's calibration lines")
    check_number("--port", port, 0, 65535)
    check_number("--idle-timeout", idle_timeout, 0.0, 86400.0, lo_open=True)
    check_number("--max-connections", max_connections, 1, 1024)
    sizes = tuple(parse_size(s) for s in (size or ["160x160"]))
    logger = logging.getLogger("spade_deploy.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s spade serve: %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    serve_mrd(checkpoint, ServeConfig(host=host, port=port, device=device, backend=backend, engines=engines,
                                      sizes=sizes, pixels=pixels, idle_timeout=idle_timeout,
                                      max_connections=max_connections))


@app.command()
@user_errors
def send(
    raw: Annotated[Path, typer.Argument(help="An ISMRMRD raw HDF5 file (/dataset/xml + /dataset/data), e.g. from spade convert.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="MRD image file for the images the server returns.")],
    host: Annotated[str, typer.Option(help="The MRD server's address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The MRD server's port.")] = 9002,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the server's answer.")] = 600.0,
    config: Annotated[str, typer.Option(help="Config name sent first (spade serve logs and ignores it; other servers choose their recon by it).")] = "spade",
):
    """Stream a raw file to an MRD server (spade serve, or any MRD streaming server) and write the images it returns."""
    res = send_file(raw, out, host, port, timeout, config)
    first = f"first image after {res.image_seconds[0]:.2f} s, " if res.image_seconds else ""
    console.print(f"{len(res.images)} image{'s' if len(res.images) != 1 else ''} from {host}:{port} written to [cyan]{out}[/] ({res.acquisitions} "
                  f"acquisitions sent; {first}all after {res.seconds:.2f} s)")


@app.command()
@user_errors
def convert(
    source: Annotated[Path, typer.Argument(help="A fastMRI multi-coil HDF5 file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The ISMRMRD raw HDF5 file to write (not in the source's folder).")],
    acceleration: Annotated[Optional[int], typer.Option("--acceleration", "-a", help="Undersample with fastMRI's equispaced mask and the file's seed (the measurements spade reconstruct -a takes); default: every line, or the file's own mask.")] = None,
    center_fraction: CfOpt = None,
):
    """Convert a fastMRI HDF5 file to ISMRMRD raw data: one acquisition per measured line, calibration lines flagged, a stream for spade send or any MRD client."""
    if center_fraction is not None and acceleration is None:
        raise SpadeError("--center-fraction sets the calibration block of an undersampling: add --acceleration")
    if acceleration is not None:
        check_sampling(acceleration, center_fraction)
    res = fastmri_to_raw(source, out, acceleration, center_fraction)
    calib = (f"calibration lines {res.calibration[0]}-{res.calibration[1] - 1} flagged"
             if res.calibration else "fully sampled")
    console.print(f"{source.name}: {res.slices} slices x {res.lines_per_slice} of {res.columns} lines "
                  f"(acceleration {res.acceleration:.2f}, {calib}) written to [cyan]{out}[/]")


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
    default = [] if target_speedup is not None else PAPER_RATIOS
    results = prune_run(checkpoint, list(ratios or default), out or checkpoint.parent / "pruned", round_to,
                        target_speedup=target_speedup, size=(size, size), device=device, reporter=ConsoleReporter())
    _show_prune(checkpoint, results, (size, size))


def _show_prune(checkpoint: Path, results, size) -> None:
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
        if rep.verdict():
            console.print(rep.verdict(), markup=False)
        elif rep.gain is not None:
            console.print(f"ratio {rep.ratio:g}: priors measured x{1 / (1 - rep.gain):.2f} faster than unpruned on {rep.device}",
                          markup=False)
        s = rep.speedup
        if s is not None:
            verdict = "reached" if s.reached else "NOT reached (within 10 %)"
            console.print(f"target x{s.target:g} {verdict}: ratio {s.ratio:.3g}, measured prior speed-up x{s.speedup:.2f} "
                          f"({s.unpruned_ms:.2f} -> {s.pruned_ms:.2f} ms on {s.device}, {s.input[0]}x{s.input[1]}), "
                          f"params {rep.params_after:,}, MACs {rep.macs_after / 1e6:,.1f} M")


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
    res = export_checkpoint(checkpoint, out, trt=trt, fp16=fp16, opset=opset, size=hw)
    table = Table(title=f"Exported {checkpoint.name}")
    for col in ("prior", "ONNX", "parameters", "max rel. error vs PyTorch"):
        table.add_column(col, justify="right")
    for p in res.priors:
        table.add_row(p.name, p.onnx, f"{p.params:,}", f"{p.max_rel_error:.2e}")
    print_table(table)
    console.print(f"manifest: [cyan]{res.manifest_path}[/]")


@app.command()
@user_errors
@with_task_options("bench")
def bench(
    checkpoints: Annotated[list[Path], typer.Argument(help="The unpruned model and any pruned / fine-tuned ones.")],
    backend: Annotated[Optional[list[str]], typer.Option("--backend", "-b", help="auto | torch | onnxruntime | tensorrt (repeatable; default auto: the engine measured fastest on this device at the data's size, recorded in the export manifest).")] = None,
    engines: Annotated[Path, typer.Option(help="Folder of exported priors (exported on the fly when missing).")] = Path("engines"),
    data: DataOpt = None,
    split: Annotated[str, typer.Option(help="Split scored for quality.")] = "test",
    repeats: Annotated[int, typer.Option(help="Interleaved timing rounds: each reconstructs every test slice once per variant (per-slice median over rounds, mean over slices).")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed reconstructions first (>= 0).")] = 1,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for JSON / CSV / Markdown / PNG results.")] = Path("benchmarks/results"),
    precision: Annotated[str, typer.Option("--precision", help="auto (fixed-point models with the auto back-end: a bf16->fp32 precision schedule where measured faster here, FP32 otherwise) | fp32 | bf16 | fp16 (a fixed-point model's schedule; unrolled models are refused).")] = "auto",
    task_options: Optional[dict] = None,
):
    """Score and time the unpruned model and its pruned / fine-tuned variants on every back-end (MRI: fastMRI's scores; super-resolution: USRNet's, over --scale x --kernel)."""
    check_choice("--split", split, SPLITS)
    check_number("--repeats", repeats, 1, 10_000)
    check_number("--warmup", warmup, 0, 10_000)
    check_device(device)
    task, root = _task(_checkpoint_task(checkpoints[0]), data, "bench", task_options)
    with default_precision(precision):
        _show_bench(bench_checkpoints(checkpoints, list(backend or ["auto"]), engines, root, split, task, repeats, warmup,
                                      device, out, reporter=ConsoleReporter()))


def _show_bench(run) -> None:
    result = run.result
    opts = ", ".join(f"{k} {v}" for k, v in run.task_options.items() if not isinstance(v, list) or len(v) < 4)
    table = Table(title=f"SPADE benchmark on {result.device} ({run.split}, {opts}; {result.baseline} PSNR "
                        f"{result.psnr_baseline:.2f} dB)")
    for col in B.columns(result):
        table.add_column(col, justify="right", no_wrap=True)
    for row in B.table_rows(result):
        table.add_row(*row)
    print_table(table)
    console.print(B.AGGREGATION + "; speed-ups against the unpruned PyTorch model; efficiency = per-iteration "
                  "speed-up / MAC ratio; on cap = slices stopped by the iteration cap.", soft_wrap=True)
    for line in B.buys_nothing(result):
        console.print(f"[yellow]{escape(line)}[/]", soft_wrap=True)
    console.print("results: " + ", ".join(f"[cyan]{p}[/]" for p in run.paths.values()))


def main() -> None:
    """The ``spade`` command: a malformed command line (an option value of the wrong type, an
    unknown option, a missing argument) is one ``error:`` line and exit status 1, like every other
    bad input, not click's usage block."""
    try:  # typer >= 0.2x runs on its own copy of click
        from typer._click.exceptions import UsageError
    except ImportError:  # pragma: no cover - older typer
        from click.exceptions import UsageError

    try:
        hostmem.keep_freed_memory()
    except SpadeError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    try:
        code = app(standalone_mode=False)
    except UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx is not None else "spade"
        err_console.print(f"[bold red]error:[/] {escape(cmd + ': ' + ' '.join(exc.format_message().split()))} (see --help)",
                          highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.Abort:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
