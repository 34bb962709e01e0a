"""Record (or check) the MRI results the task seam must leave unchanged.

``python tests/golden/record_mri.py OUT.json`` builds the tiny simulated dataset (seed 0), then per
model (deq, varnet, e2e-varnet; tiny presets): evaluate() on the test split (per-volume PSNR / SSIM
/ NMSE, iterations) and a two-step fit() per strategy (supervised on train; school and
self-supervised on the test measurements with their fixed masks), the SHA-256 of the final
weights. tests/test_task_seam.py compares the current code with the recorded file.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

GOLDEN_CONFIG = dict(train_volumes=2, train_slices=2, val_volumes=1, val_slices=1, test_volumes=1, test_slices=2,
                     size=48, n_coils=8)


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def record(root: Path, work: Path, models=("deq", "varnet", "e2e-varnet")) -> dict:
    from spade_deploy.mri import reader, simulate
    from spade_deploy.losses import STRATEGIES
    from spade_deploy.models import build_model
    from spade_deploy.train import TrainConfig, evaluate, fit

    simulate.build_default_dataset(root, seed=0, config=simulate.SimConfig(**GOLDEN_CONFIG))
    train, val, test = (reader.SliceDataset(root / s) for s in ("train", "val", "test"))
    out: dict = {"torch": torch.__version__, "models": {}}
    for name in models:
        torch.manual_seed(0)
        model = build_model(name, preset="tiny")
        try:  # the task seam's API; before it, evaluate took the acceleration
            from spade_deploy.mri.task import MRITask

            res = evaluate(model, test, MRITask(6), batch_size=2)
        except ImportError:
            res = evaluate(model, test, acceleration=6, batch_size=2)
        entry = {"eval": {"psnr": res.psnr, "ssim": res.ssim, "nmse": res.nmse, "psnr_zero_filled": res.psnr_zero_filled,
                          "psnr_sense": res.psnr_sense, "mean_iterations": res.mean_iterations,
                          "per_volume": res.per_volume}, "fit": {}}
        teacher = model
        for strategy, loss_cls in STRATEGIES.items():
            torch.manual_seed(0)
            student = build_model(name, preset="tiny")
            student.load_state_dict(teacher.state_dict())
            lw = 0.1 if name == "deq" else 0.0
            deq = dict(train_max_iter=10, lipschitz_weight=lw, lipschitz_target=0.96,
                       pretrain_steps=2 if strategy == "supervised" else 0)
            try:  # the DEQ's options have their own class since the toolchain keeps each model's extras with it
                from spade_deploy.mri.deq import DEQTrainOptions

                shared = dict(model_options=DEQTrainOptions(**deq) if name == "deq" else None)
            except ImportError:
                shared = deq
            cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=2, max_steps_per_epoch=2, fixed_masks=strategy != "supervised",
                              **shared)
            ds = train if strategy == "supervised" else test
            fr = fit(student, loss_cls(), ds, val, cfg, work / f"{name}-{strategy}", checkpoint_seconds=None,
                     teacher=teacher if loss_cls.needs_teacher else None)
            entry["fit"][strategy] = {"weights": weights_hash(student), "history": fr.history}
        out["models"][name] = entry
    return out


def main(path: str) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = record(Path(tmp) / "data", Path(tmp) / "runs")
    Path(path).write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps({k: {"psnr": v["eval"]["psnr"], "it": v["eval"]["mean_iterations"]}
                      for k, v in result["models"].items()}))


if __name__ == "__main__":
    main(sys.argv[1])
