"""USRNet for super-resolution: the official architecture and counts, Table 4's pruned counts, the
SR physics and its closed-form data step, the official degradation and metrics, the data, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.signal import correlate2d
from typer.testing import CliRunner

from spade_deploy.checkpoint import load_model, save_model
from spade_deploy.cli.main import app
from spade_deploy.errors import SpadeError
from spade_deploy.deploy.export import export_onnx
from spade_deploy.models import build_model, config_from_dict, count_parameters, load_state
from spade_deploy.sr.usrnet import USRNetConfig
from spade_deploy.prune import prune_model
from spade_deploy.deploy.runtime import deploy
from spade_deploy.sr import data as srdata
from spade_deploy.sr.baseline import bicubic_upsample
from spade_deploy.sr.degradation import crop_multiple, degrade, degrade_tensor
from spade_deploy.sr.kernels import kernel_names, load_kernel, paper_kernels
from spade_deploy.sr.metrics import psnr, sr_scores, ssim, to_uint8
from spade_deploy.sr.physics import SRPhysics
from spade_deploy.sr.task import SRTask

# Table 4 of the paper: USRNet (17,016,016 parameters) pruned at 5 / 10 / 20 / 40 %.
TABLE4 = {0.05: 15_314_620, 0.1: 13_730_964, 0.2: 10_837_246, 0.4: 6_094_762}
PAPER = dict(n_iter=8, h_nc=64, nc=(64, 128, 256, 512), nb=2)
TINY = dict(n_iter=6, h_nc=32, nc=(16, 32, 64, 64), nb=2)

runner = CliRunner()


def official_state_dict(n_iter, h_nc, nc, nb, seed=0) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of cszn/USRNet's ``models/network_usrnet_v1.py``
    (``basicblock.sequential`` flattens each level: residual blocks ``i.res.0`` / ``i.res.2``, the
    strided 2 x 2 convolution after them going down, the transposed one at index 0 going up)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"p.m_head.weight": (nc[0], 4, 3, 3)}

    def blocks(prefix, c, start):
        for i in range(start, start + nb):
            shapes[f"{prefix}.{i}.res.0.weight"] = (c, c, 3, 3)
            shapes[f"{prefix}.{i}.res.2.weight"] = (c, c, 3, 3)

    for level in (1, 2, 3):
        blocks(f"p.m_down{level}", nc[level - 1], 0)
        shapes[f"p.m_down{level}.{nb}.weight"] = (nc[level], nc[level - 1], 2, 2)
    blocks("p.m_body", nc[3], 0)
    for level in (3, 2, 1):
        shapes[f"p.m_up{level}.0.weight"] = (nc[level], nc[level - 1], 2, 2)  # ConvTranspose2d: (in, out, kh, kw)
        blocks(f"p.m_up{level}", nc[level - 1], 1)
    shapes["p.m_tail.weight"] = (3, nc[0], 3, 3)
    for i, (cin, cout) in zip((0, 2, 4), ((2, h_nc), (h_nc, h_nc), (h_nc, 2 * n_iter))):
        shapes[f"h.mlp.{i}.weight"] = (cout, cin, 1, 1)
        shapes[f"h.mlp.{i}.bias"] = (cout,)
    return {k: 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()}


def _degraded_pair(scale=2, kernel_index=0, size=48):
    hr = srdata.embedded_images("val", crop=size)[0].image
    hr, lr = degrade(hr, paper_kernels()[kernel_index], scale)
    return hr, torch.from_numpy(lr).permute(2, 0, 1)[None]


# -------------------------------------------------------------------------------------------
# The architecture
# -------------------------------------------------------------------------------------------
def test_presets_have_the_official_parameter_counts():
    assert count_parameters(build_model("usrnet", preset="paper")) == 17_016_016  # usrnet.pth, Table 4
    assert count_parameters(build_model("usrnet", preset="tiny")) == 590_332  # usrnet_tiny.pth
    small = build_model("usrnet", preset="small")
    assert count_parameters(small) < count_parameters(build_model("usrnet", preset="tiny"))


@pytest.mark.parametrize("cfg", [PAPER, TINY], ids=["paper", "tiny"])
def test_a_state_dict_with_the_official_keys_loads_strictly(cfg):
    state = official_state_dict(**cfg)
    model = build_model("usrnet", preset="paper" if cfg is PAPER else "tiny")
    assert set(model.state_dict()) == set(state)
    load_state(model, state)  # strict, shapes checked
    assert sum(v.numel() for v in state.values()) == count_parameters(model)
    assert torch.equal(model.p.m_up2[0].weight, state["p.m_up2.0.weight"])


def test_import_command_reads_an_official_checkpoint_without_executing_it(tmp_path):
    torch.manual_seed(0)
    state = official_state_dict(**TINY)
    src = tmp_path / "usrnet_tiny.pth"
    torch.save(state, src)
    out = tmp_path / "imported.safetensors"
    result = runner.invoke(app, ["import", str(src), "-o", str(out), "-m", "usrnet", "--preset", "tiny"])
    assert result.exit_code == 0, result.output
    model, manifest = load_model(out)
    assert manifest["model"] == "usrnet" and manifest["imported"]["format"] == "usrnet-official"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # another architecture than the preset asked for: one line, exit 1, nothing written
    refused = tmp_path / "refused.safetensors"
    result = runner.invoke(app, ["import", str(src), "-o", str(refused), "-m", "usrnet", "--preset", "paper"])
    assert result.exit_code == 1 and result.stderr.startswith("error:") and "nc [16, 32, 64, 64]" in result.stderr
    assert not refused.exists()
    # a pickle that would run code is refused by weights_only
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"p.m_head.weight": Evil()}, tmp_path / "evil.pth")
    result = runner.invoke(app, ["import", str(tmp_path / "evil.pth"), "-o", str(refused), "-m", "usrnet"])
    assert result.exit_code == 1 and "executed" not in result.output and not refused.exists()
    assert len(result.stderr.strip().splitlines()) == 1


def test_official_presets_start_from_nearest_neighbour_and_small_from_bicubic(tmp_path):
    """Imported official weights run the official loop; the small preset's start is kept in its
    checkpoints; a checkpoint written before the option existed runs as it did (nearest)."""
    assert build_model("usrnet", preset="paper").cfg.init == build_model("usrnet", preset="tiny").cfg.init == "nearest"
    torch.manual_seed(0)
    small = build_model("usrnet", preset="small").eval()
    assert small.cfg.init == "bicubic"
    y = torch.rand(1, 3, 16, 16)
    physics = SRPhysics(paper_kernels()[0], 2)
    seen = []
    small.p.register_forward_pre_hook(lambda m, args: seen.append(args[0][:, :3].clone()))
    with torch.no_grad():
        small(y, physics)
    first = physics.data_step(bicubic_upsample(y, 2), y, small.hyper_parameters(physics, 1)[:, :1])
    assert torch.allclose(seen[0], first, atol=1e-6)
    save_model(tmp_path / "small.safetensors", small)
    assert load_model(tmp_path / "small.safetensors")[0].cfg.init == "bicubic"
    assert config_from_dict(USRNetConfig, {"n_iter": 4, "h_nc": 32, "nc": [16, 32, 64, 64], "nb": 1}).init == "nearest"
    with pytest.raises(SpadeError, match="unknown USRNet initialisation"):
        config_from_dict(USRNetConfig, {"init": "bilinear"})


def test_forward_pads_the_prior_input_to_multiples_of_8_and_keeps_the_size():
    torch.manual_seed(0)
    model = build_model("usrnet", preset="small").eval()
    k = paper_kernels()[3]
    physics = SRPhysics(k, 3)
    y = torch.rand(2, 3, 13, 10)  # HR 39 x 30: neither a multiple of 8
    seen = []
    model.p.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        x = model(y, physics)
    assert x.shape == (2, 3, 39, 30) and torch.isfinite(x).all()
    assert seen and all(s == (2, 4, 40, 32) for s in seen) and len(seen) == model.cfg.n_iter


def test_a_short_training_run_raises_psnr():
    """Gradients flow through the FFT data step and the hyper-parameter MLP: 40 Adam steps on
    x2 patches of the embedded training photographs raise the PSNR of the untrained network."""
    torch.manual_seed(0)
    model = build_model("usrnet", preset="small")
    img = srdata.embedded_images("train", crop=96)[0].image
    hr = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255
    physics = SRPhysics(paper_kernels()[1], 2)
    patches = torch.cat([hr[..., i : i + 32, j : j + 32] for i in (0, 32, 64) for j in (0, 32, 64)])
    y = degrade_tensor(patches, physics)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def score():
        with torch.no_grad():
            return -10 * math.log10(float(((model(y, physics) - patches) ** 2).mean()))

    before = score()
    for _ in range(40):
        opt.zero_grad()
        loss = (model(y, physics) - patches).abs().mean()
        loss.backward()
        opt.step()
    assert score() > before + 1.0


# -------------------------------------------------------------------------------------------
# Pruning (Table 4) and export
# -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paper_pruned():
    torch.manual_seed(0)
    model = build_model("usrnet", preset="paper").eval()
    return model, {r: prune_model(model, r) for r in TABLE4}


def test_paper_usrnet_pruned_has_table4_counts(paper_pruned, tmp_path):
    model, pruned = paper_pruned
    assert count_parameters(model) == 17_016_016
    for ratio, (net, report) in pruned.items():
        assert report.params_after == count_parameters(net) == TABLE4[ratio], ratio
        assert net.p.m_tail.out_channels == 3 and net.p.m_head.in_channels == 4  # interface kept
        assert net.h.mlp[4].out_channels == 16  # one alpha and one beta per iteration
        assert report.macs_after < report.macs_before
    net = pruned[0.4][0]
    path = save_model(tmp_path / "p.safetensors", net, pruning={"ratio": 0.4})
    again, _ = load_model(path)  # rebuilt from the shape manifest
    assert count_parameters(again) == TABLE4[0.4]


def test_every_pruned_prior_exports_to_onnx_with_parity(paper_pruned, tmp_path):
    _, pruned = paper_pruned
    for ratio, (net, _) in pruned.items():
        result = export_onnx(net, tmp_path / str(ratio), "usrnet", example_size=(32, 32), check_size=(1, 40, 56))
        assert [e.name for e in result.priors] == ["prior"]  # the hyper-parameter MLP stays in PyTorch
        assert result.priors[0].max_rel_error < 1e-4, (ratio, result.priors[0].max_rel_error)


def test_onnx_prior_runs_inside_the_unrolled_loop(tmp_path):
    torch.manual_seed(0)
    net, _ = prune_model(build_model("usrnet", preset="tiny").eval(), 0.4)
    result = export_onnx(net, tmp_path, "tiny")
    deployed = deploy(net, "onnxruntime", result.manifest_path)
    _, y = _degraded_pair(scale=3, size=48)
    physics = SRPhysics(paper_kernels()[8], 3)
    with torch.no_grad():
        ref, got = net(y, physics), deployed(y, physics)
    assert (ref - got).abs().max() < 1e-4


# -------------------------------------------------------------------------------------------
# Physics
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1, 2, 3, 4])
def test_data_step_solves_its_normal_equations(scale):
    """``(A^T A + alpha I) x = A^T y + alpha z`` solved densely on a small random case."""
    g = torch.Generator().manual_seed(scale)
    k = torch.rand(5, 4, generator=g, dtype=torch.float64)
    physics = SRPhysics(k / k.sum(), scale)
    h, w = 5 * scale, 4 * scale
    eye = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
    a = physics.A(eye).reshape(h * w, -1).T
    alphas = torch.tensor([0.05, 3.0], dtype=torch.float64).view(2, 1, 1, 1)
    z = torch.randn(2, 1, h, w, generator=g, dtype=torch.float64)
    y = torch.randn(2, 1, h // scale, w // scale, generator=g, dtype=torch.float64)
    x = physics.data_step(z, y, alphas)
    shared = physics.data_step(z, y, alphas, physics.data_terms(y))  # as the loop calls it
    for b in range(2):
        alpha = float(alphas[b])
        direct = torch.linalg.solve(a.T @ a + alpha * torch.eye(h * w, dtype=torch.float64),
                                    a.T @ y[b].reshape(-1) + alpha * z[b].reshape(-1))
        assert torch.allclose(x[b].reshape(-1), direct, atol=1e-10, rtol=1e-10)
        assert torch.allclose(shared[b].reshape(-1), direct, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_adjoint(scale):
    g = torch.Generator().manual_seed(0)
    physics = SRPhysics(paper_kernels()[9], scale)
    x = torch.randn(2, 3, 24 * scale, 16 * scale, generator=g, dtype=torch.float64)
    y = torch.randn(2, 3, 24, 16, generator=g, dtype=torch.float64)
    lhs, rhs = (physics.A(x) * y).sum(), (x * physics.A_adjoint(y)).sum()
    assert abs(float(lhs - rhs)) < 1e-10 * float(lhs.abs())


@pytest.mark.parametrize("kernel_index", [0, 7, 11])
def test_blur_is_scipy_wrap_convolution_and_downsampler_keeps_pixel_0_0(kernel_index):
    k = paper_kernels()[kernel_index]
    x = np.random.default_rng(0).random((40, 32, 3))
    ref = ndimage.convolve(x, k[..., None], mode="wrap")[::4, ::4]
    got = SRPhysics(k, 4).A(torch.from_numpy(x).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    assert np.abs(ref - got).max() < 1e-12


def test_per_sample_kernels_and_selection():
    ks = paper_kernels()
    physics = SRPhysics(torch.stack([torch.from_numpy(ks[0]), torch.from_numpy(ks[10])]).unsqueeze(1), 2, [0.0, 0.01])
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    y = physics.A(x)
    for b, k in ((0, ks[0]), (1, ks[10])):
        assert torch.allclose(y[b : b + 1], SRPhysics(k, 2).A(x[b : b + 1]))
    sub = physics.select([1])
    assert torch.allclose(sub.A(x[1:]), y[1:]) and float(sub.sigma(1)) == pytest.approx(0.01)


def test_rotated_operator_blurs_the_rotated_scene_with_the_rotated_kernel():
    ks = paper_kernels()
    physics = SRPhysics(ks[10], 2)  # a motion kernel: not symmetric
    x = torch.rand(3, 3, 32, 48, dtype=torch.float64)
    turns = [1, 2, 3]
    rotated = physics.rotate(turns)
    for b, k in enumerate(turns):
        x_phi = torch.rot90(x[b : b + 1], k, dims=(-2, -1))
        blurred = torch.rot90(physics.blur(x[b : b + 1]), k, dims=(-2, -1))
        assert torch.allclose(rotated.select([b]).blur(x_phi), blurred, atol=1e-12)
        assert rotated.select([b]).A(x_phi).shape[-2:] == (x_phi.shape[-2] // 2, x_phi.shape[-1] // 2)
    assert not torch.allclose(rotated.kernel[0], physics.kernel[0])
    with pytest.raises(SpadeError, match="quarter turns"):
        SRPhysics(np.full((3, 5), 1 / 15), 2).rotate([0, 1])


# -------------------------------------------------------------------------------------------
# Degradation, metrics, data
# -------------------------------------------------------------------------------------------
def test_degradation_follows_the_official_recipe():
    img = srdata.embedded_images("test")[1].image  # coffee, 400 x 600
    k = paper_kernels()[4]
    hr, lr = degrade(img, k, 3)
    assert hr.shape == (384, 600, 3) and crop_multiple(3) == 24  # modcrop to lcm(3, 8)
    expected = ndimage.convolve(img[:384, :600], k[..., None], mode="wrap")[::3, ::3]  # uint8 in and out
    assert np.array_equal(lr, expected.astype(np.float32) / 255)
    # the torch path used for training batches gives the same uint8 values
    physics = SRPhysics(k, 3)
    t = torch.from_numpy(hr.copy()).permute(2, 0, 1)[None].double() / 255
    assert torch.equal(degrade_tensor(t, physics)[0].permute(1, 2, 0).float(), torch.from_numpy(lr))
    _, noisy = degrade(img, k, 3, noise=0.01)
    assert 0.008 < float(np.std(noisy - lr)) < 0.012 and np.array_equal(noisy, degrade(img, k, 3, noise=0.01)[1])


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_baseline_is_aligned_with_the_downsampler(scale):
    """The baseline passes through the low-resolution samples where the downsampler took them, and
    so beats plain (pixel-centre) bicubic interpolation on a degraded photograph."""
    hr, y = _degraded_pair(scale, kernel_index=0, size=96)
    up = bicubic_upsample(y, scale)
    assert up.shape[-2:] == (y.shape[-2] * scale, y.shape[-1] * scale)
    assert torch.allclose(up[..., ::scale, ::scale], y, atol=1e-5)
    plain = torch.nn.functional.interpolate(y, scale_factor=scale, mode="bicubic")
    assert psnr(hr, up, scale**2) > psnr(hr, plain, scale**2) + 1.0


def test_training_relative_to_bicubic_measures_each_tile_against_it(tmp_path):
    """``relative_to="baseline"`` (the shipped base's training) counts each tile by its error
    relative to bicubic upsampling's: bicubic itself scores exactly 1 on every tile whatever its
    kernel (below one grey level of error per pixel, against that level), so the narrow kernels,
    where bicubic is good, weigh as much as the wide ones; halving every error quarters the loss.
    The trainer sets it, for supervised losses only."""
    import spade_deploy.train as train_mod
    from spade_deploy.losses import SupervisedLoss, relative_sq_error

    task = SRTask(scales=(4,))
    np.random.seed(0)
    ds = task.dataset(None, "train")
    batch = task.train_batch(task.collate([ds[i] for i in range(0, 40, 5)]))
    assert len(set(batch.meta["kernels"])) > 1 and batch.error_scale is None
    scale = task.baseline_error(batch)
    up = bicubic_upsample(batch.y, 4).clamp(0, 1)
    mse = (up - batch.x_gt).pow(2).flatten(1).mean(1)
    floor = 1 / 255.0**2
    assert (mse > floor).sum() >= 4
    for b in range(batch.y.shape[0]):  # each tile on its own, not just on average
        got = float(relative_sq_error(up[b : b + 1], batch.x_gt[b : b + 1], scale[b : b + 1]))
        assert got == pytest.approx(min(1.0, float(mse[b]) / floor), rel=1e-4)
    half = batch.x_gt + (up - batch.x_gt) / 2
    batch.error_scale = scale
    model = build_model("usrnet", preset="small")
    assert float(SupervisedLoss()(half, batch, model)) == pytest.approx(float(SupervisedLoss()(up, batch, model)) / 4, rel=1e-4)

    seen = []

    class Spy(SupervisedLoss):
        def __call__(self, x_net, batch, model, teacher=None):
            seen.append(batch.error_scale)
            return super().__call__(x_net, batch, model, teacher)

    cfg = train_mod.TrainConfig(epochs=1, batch_size=4, max_steps_per_epoch=1, relative_to="baseline")
    small = SRTask(scales=(2,), crop=64, patch=48)
    train_mod.fit(build_model("usrnet", preset="small"), Spy(), small.dataset(None, "train"), None, cfg,
                  tmp_path, task=small)
    # one step of a batch of 4: each tile backpropagated alone (the trainer's per-sample steps),
    # each with its own bicubic error as the scale
    assert len(seen) == 4 and all(s is not None and s.shape == (1,) for s in seen)
    with pytest.raises(SpadeError, match="no baseline error"):  # before any data is read
        train_mod.fit(build_model("deq", preset="small"), SupervisedLoss(), None, None, cfg, tmp_path / "deq")
    result = CliRunner().invoke(app, ["train", "-m", "usrnet", "--relative-to", "bicubic", "-o", str(tmp_path / "r")])
    assert result.exit_code != 0 and "--relative-to" in result.output and "Traceback" not in result.output


class _Bicubic(torch.nn.Module):
    """Bicubic upsampling as a reconstructor, scored by the task like any model."""

    def forward(self, y, physics):
        return bicubic_upsample(y, physics.scale)


def test_official_test_loop_averages_per_scale_and_kernel():
    """SRTask.evaluate is USRNet's test loop: every image degraded at every scale with every kernel,
    scored per image and averaged per (scale, kernel), in the order of the scales and kernels."""
    kernels = paper_kernels()
    task = SRTask(scales=(2, 4), kernels={"k1": kernels[0], "k10": kernels[9]}, crop=64)
    images = task.images("test")
    assert [im.name for im in images] == [im.name for im in srdata.embedded_images("test", crop=64)]
    cases = task.dataset(None, "test")
    assert len(cases) == 2 * 2 * len(images)
    res = task.evaluate(_Bicubic(), cases, batch_size=1)
    rows = res.rows
    assert [(r.scale, r.kernel) for r in rows] == [(2, "k1"), (2, "k10"), (4, "k1"), (4, "k10")]
    hr, lr = degrade(images[1].image, kernels[9], 4)
    direct = sr_scores(hr, bicubic_upsample(torch.from_numpy(lr).permute(2, 0, 1)[None], 4), 4)
    assert rows[3].per_image[images[1].name] == direct
    assert rows[3].psnr == pytest.approx(np.mean([s["psnr"] for s in rows[3].per_image.values()]))
    assert res.psnr == pytest.approx(np.mean([r.psnr for r in rows]))
    torch.manual_seed(0)
    one = SRTask(scales=(2,), kernels={"k1": kernels[0]}, crop=64)
    model_rows = one.evaluate(build_model("usrnet", preset="small"), one.dataset(None, "test")).rows
    assert [(r.scale, r.kernel) for r in model_rows] == [(2, "k1")]
    assert model_rows[0].per_image.keys() == {im.name for im in images}
    # the baseline beside the model is the bicubic model's own score on the same cases
    assert model_rows[0].psnr_bicubic == pytest.approx(rows[0].psnr, abs=1e-9)


def _wang_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM as the official test computes it: 11 x 11 Gaussian (1.5), valid positions, channel mean."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    out = []
    for c in range(3):
        x, y = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        mx, my = correlate2d(x, win, "valid"), correlate2d(y, win, "valid")
        sxx = correlate2d(x * x, win, "valid") - mx**2
        syy = correlate2d(y * y, win, "valid") - my**2
        sxy = correlate2d(x * y, win, "valid") - mx * my
        out.append((((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))).mean())
    return float(np.mean(out))


def test_metrics_are_the_official_tests():
    rng = np.random.default_rng(0)
    hr = srdata.embedded_images("val", crop=64)[0].image
    est = np.clip(hr / 255 + rng.normal(0, 0.03, hr.shape), 0, 1)  # float estimate, rounded to uint8
    est8 = np.uint8((est * 255).round())
    for scale in (2, 3, 4):
        b = scale**2
        a, e = hr[b:-b, b:-b].astype(np.float64), est8[b:-b, b:-b].astype(np.float64)
        scores = sr_scores(hr, est, scale)
        assert scores["psnr"] == pytest.approx(20 * np.log10(255 / np.sqrt(np.mean((a - e) ** 2))), abs=1e-12)
        assert scores["ssim"] == pytest.approx(_wang_ssim(hr[b:-b, b:-b], est8[b:-b, b:-b]), abs=1e-6)
    tensor = torch.from_numpy(est).permute(2, 0, 1)[None]
    assert np.array_equal(to_uint8(tensor), est8) and psnr(hr, tensor, 4) == psnr(hr, est8, 4)
    assert psnr(hr, hr) == math.inf and ssim(hr, hr, 4) == pytest.approx(1.0)


def test_embedded_photographs_and_splits():
    names = {s: srdata.embedded_names(s) for s in srdata.SPLITS}
    assert sum(map(len, names.values())) == len(set(sum(names.values(), []))) == 13  # disjoint
    for split in srdata.SPLITS:
        for im in srdata.embedded_images(split):
            assert im.image.dtype == np.uint8 and im.image.ndim == 3 and im.image.shape[2] == 3
            assert min(im.image.shape[:2]) >= 300 and im.image.std() > 20  # real photographs, not flat
    assert srdata.embedded_images("test", crop=128)[0].image.shape == (128, 128, 3)
    assert kernel_names()[0] == "k1" and len(paper_kernels()) == 12


def test_user_folder_converts_greyscale_and_refuses_16_bit_and_tiny_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(folder / "b.bmp")
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / "c.jpg")
    (folder / "notes.txt").write_text("not an image")
    images = srdata.folder_images(folder)
    assert [i.name for i in images] == ["a", "b", "c"] and all(i.image.shape == (40, 48, 3) for i in images)
    grey = images[1].image
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 0], grey[..., 2])

    Image.fromarray(rng.integers(0, 65535, (40, 48), dtype=np.uint16)).save(folder / "d.png")
    with pytest.raises(SpadeError, match="16-bit") as err:
        srdata.folder_images(folder)
    assert "\n" not in str(err.value)
    (folder / "d.png").unlink()
    Image.fromarray(rng.integers(0, 255, (6, 48, 3), dtype=np.uint8)).save(folder / "e.png")
    with pytest.raises(SpadeError, match="6 x 48, smaller than the 8 x 8"):
        srdata.folder_images(folder, min_size=8)
    with pytest.raises(SpadeError, match="no PNG / JPEG / BMP"):
        srdata.folder_images(tmp_path)
    with pytest.raises(SpadeError, match="not found"):
        srdata.folder_images(tmp_path / "missing")


@pytest.mark.parametrize(
    "kernel, match",
    [
        (np.full((5, 5, 3), 1 / 75), "must be a 2-D array"),
        (np.full((5, 5), 0.05), "must be normalised"),
        (np.array([[np.nan, 1.0]]), "non-finite"),
        (np.full((41, 41), 1 / 41**2), "larger than the"),
    ],
)
def test_bad_kernels_are_one_line_errors(kernel, match):
    img = np.zeros((40, 40, 3), dtype=np.uint8)
    with pytest.raises(SpadeError, match=match) as err:
        degrade(img, kernel, 2)
    assert "\n" not in str(err.value)
    with pytest.raises(SpadeError, match=match):  # the operator checks the same at build / apply time
        SRPhysics(kernel, 2).A(torch.zeros(1, 3, 40, 40))


@pytest.mark.parametrize("scale", [0, 5, 2.5, True, "2"])
def test_bad_scales_are_one_line_errors(scale):
    with pytest.raises(SpadeError, match="scale factor must be one of 1, 2, 3, 4"):
        SRPhysics(paper_kernels()[0], scale)


def test_bad_images_and_kernel_files_are_one_line_errors(tmp_path):
    k = paper_kernels()[0]
    with pytest.raises(SpadeError, match="uint8 RGB"):
        degrade(np.zeros((64, 64), dtype=np.uint8), k, 2)  # greyscale array where RGB is expected
    with pytest.raises(SpadeError, match="uint8 RGB"):
        degrade(np.zeros((64, 64, 3), dtype=np.uint16), k, 2)
    with pytest.raises(SpadeError, match="smaller than the 24 x 24"):
        degrade(np.zeros((20, 64, 3), dtype=np.uint8), k, 3)
    model = build_model("usrnet", preset="tiny")
    with pytest.raises(SpadeError, match="larger than the 12 x 12 image"):
        model(torch.rand(1, 3, 6, 6), SRPhysics(k, 2))
    np.save(tmp_path / "k.npy", k)
    assert np.array_equal(load_kernel(tmp_path / "k.npy"), k)
    np.save(tmp_path / "bad.npy", k * 2)
    with pytest.raises(SpadeError, match="sum to 2"):
        load_kernel(tmp_path / "bad.npy")
