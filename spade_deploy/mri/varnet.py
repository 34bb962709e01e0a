"""fastMRI's variational networks: VarNet with given coil maps and E2E-VarNet (Sriram et al. 2020).

Cascades of soft data consistency plus a U-Net refinement in image space,
``k <- k - w * M (k - k0) - F S U(S^H F^-1 k)``; E2E-VarNet also learns the coil maps ``S`` from the
auto-calibration lines with a second U-Net (the sensitivity network). Module names follow
``fastmri.models.VarNet`` so that ``state_dict()`` keys are identical and a checkpoint saved from
fastMRI loads unchanged (:func:`load_fastmri_checkpoint`). The numbers are fastMRI's too: the same
normalisation, padding, channel layout and centre-line detection (tested against the package).

The prunable priors are the cascades' plain U-Nets (real 2-channel in and out, at the padded
size). Normalisation, padding, the complex/channel reshuffle, FFTs and data consistency stay in the
torch loop; the sensitivity network is not pruned (as in the paper) and runs in torch.

The output is a complex image whose magnitude is fastMRI's output (the root-sum-of-squares of the
final coil images) and whose phase is that of their coil combination with the maps in use (the
equivariance term of self-supervised fine-tuning rotates and re-measures it). The model's own
prediction of the measurements is its final multi-coil k-space under the mask,
:meth:`VarNet.predicted_measurements`: the self-supervised data-fidelity term ``||M k - y||``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpadeError
from .metrics import center_crop
from .physics import MultiCoilMRI, fft2c, ifft2c
from ..models import DemoRecipe, Reconstructor, build_model, count_parameters, load_state, register_model
from ..train import TrainConfig

PAD_MULTIPLE = 16  # fastMRI's NormUnet pads height and width to multiples of 16


# ---------------------------------------------------------------------------------------------
# U-Net (fastMRI layout without dropout, which fastMRI's VarNet never enables: ConvBlock =
# [conv, IN, LeakyReLU] x 2, avg-pool down,
# transposed-conv up, skip concatenation, a final 1x1 conv). No in-place ops (torch-pruning, ONNX).
# ---------------------------------------------------------------------------------------------
class ConvBlock(nn.Module):
    # fastMRI's blocks hold Dropout2d(0) at indices 3 and 7; identities keep the parameter indices.
    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_chans, out_chans, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm2d(out_chans),
            nn.LeakyReLU(negative_slope=0.2),
            nn.Identity(),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm2d(out_chans),
            nn.LeakyReLU(negative_slope=0.2),
            nn.Identity(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransposeConvBlock(nn.Module):
    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(in_chans, out_chans, kernel_size=2, stride=2, bias=False),
            nn.InstanceNorm2d(out_chans),
            nn.LeakyReLU(negative_slope=0.2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Unet(nn.Module):
    """fastMRI's U-Net (Ronneberger et al. 2015): ``chans`` features at full resolution, doubled at
    each of ``num_pool_layers`` levels."""

    def __init__(self, in_chans: int = 2, out_chans: int = 2, chans: int = 18, num_pool_layers: int = 4):
        super().__init__()
        self.down_sample_layers = nn.ModuleList([ConvBlock(in_chans, chans)])
        ch = chans
        for _ in range(num_pool_layers - 1):
            self.down_sample_layers.append(ConvBlock(ch, ch * 2))
            ch *= 2
        self.conv = ConvBlock(ch, ch * 2)
        self.up_conv = nn.ModuleList()
        self.up_transpose_conv = nn.ModuleList()
        for _ in range(num_pool_layers - 1):
            self.up_transpose_conv.append(TransposeConvBlock(ch * 2, ch))
            self.up_conv.append(ConvBlock(ch * 2, ch))
            ch //= 2
        self.up_transpose_conv.append(TransposeConvBlock(ch * 2, ch))
        self.up_conv.append(nn.Sequential(ConvBlock(ch * 2, ch), nn.Conv2d(ch, out_chans, kernel_size=1)))

    @property
    def output_conv(self) -> nn.Conv2d:
        return self.up_conv[-1][1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for layer in self.down_sample_layers:
            x = layer(x)
            skips.append(x)
            x = F.avg_pool2d(x, kernel_size=2, stride=2, padding=0)
        x = self.conv(x)
        for up, conv in zip(self.up_transpose_conv, self.up_conv):
            skip = skips.pop()
            x = up(x)
            # odd sizes: fastMRI reflect-pads the upsampled map by one on the right / bottom
            pad_w, pad_h = int(x.shape[-1] != skip.shape[-1]), int(x.shape[-2] != skip.shape[-2])
            if pad_w or pad_h:
                x = F.pad(x, [0, pad_w, 0, pad_h], "reflect")
            x = conv(torch.cat([x, skip], dim=1))
        return x


class NormUnet(nn.Module):
    """The U-Net on complex images: real/imaginary to channels, per-sample normalisation of the real
    and imaginary groups (mean, unbiased std), zero padding to multiples of 16; all undone after."""

    def __init__(self, chans: int, num_pools: int):
        super().__init__()
        self.unet = Unet(2, 2, chans, num_pools)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: complex (B, C, H, W) -> complex (B, C, H, W) (C = 1 in the cascades)."""
        b, c, h, w = x.shape
        z = torch.cat([x.real, x.imag], dim=1)  # fastMRI's layout: all real parts, then all imaginary
        groups = z.reshape(b, 2, c * h * w)
        mean = groups.mean(dim=2).view(b, 2, 1, 1)
        std = groups.std(dim=2).view(b, 2, 1, 1)
        z = (z.view(b, 2, c, h, w) - mean.unsqueeze(2)) / std.unsqueeze(2)
        z = z.reshape(b, 2 * c, h, w)
        h_mult, w_mult = padded_size(h), padded_size(w)
        h_pad = [(h_mult - h) // 2, math.ceil((h_mult - h) / 2)]
        w_pad = [(w_mult - w) // 2, math.ceil((w_mult - w) / 2)]
        z = F.pad(z, w_pad + h_pad)
        z = self.unet(z)
        z = z[..., h_pad[0] : h_mult - h_pad[1], w_pad[0] : w_mult - w_pad[1]]
        z = z.reshape(b, 2, c, h, w) * std.unsqueeze(2) + mean.unsqueeze(2)
        return torch.complex(z[:, 0], z[:, 1])


def padded_size(n: int) -> int:
    return ((n - 1) | (PAD_MULTIPLE - 1)) + 1


# ---------------------------------------------------------------------------------------------
class SensitivityModel(nn.Module):
    """E2E-VarNet's coil-map estimator: the auto-calibration lines (found from the mask as fastMRI
    does: the symmetric fully sampled band around the centre) -> coil images -> a NormUnet per
    coil -> divided by their root-sum-of-squares."""

    def __init__(self, chans: int, num_pools: int, mask_center: bool = True):
        super().__init__()
        self.mask_center = mask_center
        self.norm_unet = NormUnet(chans, num_pools)

    @staticmethod
    def center_band(mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, W) 0/1 mask -> (B, 1, 1, W) indicator of the centre band of sampled lines."""
        m = (mask.reshape(mask.shape[0], -1) > 0).to(torch.int8)
        width = m.shape[1]
        cent = width // 2
        left = torch.argmin(m[:, :cent].flip(1), dim=1)
        right = torch.argmin(m[:, cent:], dim=1)
        n_low = torch.max(2 * torch.min(left, right), torch.ones_like(left))
        start = (width - n_low + 1) // 2
        cols = torch.arange(width, device=mask.device)
        band = (cols >= start[:, None]) & (cols < (start + n_low)[:, None])
        return band.view(-1, 1, 1, width)

    def forward(self, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.mask_center:
            y = y * self.center_band(mask)
        b, c, h, w = y.shape
        maps = self.norm_unet(ifft2c(y).reshape(b * c, 1, h, w)).reshape(b, c, h, w)
        return maps / maps.abs().pow(2).sum(dim=1, keepdim=True).sqrt()


class VarNetBlock(nn.Module):
    """One cascade: ``k - dc_weight * M (k - k0) - F S U(S^H F^-1 k)``."""

    def __init__(self, model: NormUnet):
        super().__init__()
        self.model = model
        self.dc_weight = nn.Parameter(torch.ones(1))

    def forward(self, k: torch.Tensor, k0: torch.Tensor, mask: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        soft_dc = torch.where(mask > 0, k - k0, torch.zeros((), dtype=k.dtype, device=k.device)) * self.dc_weight
        reduced = (ifft2c(k) * maps.conj()).sum(dim=1, keepdim=True)
        return k - soft_dc - fft2c(self.model(reduced) * maps)


class _LastKspace:
    """The last forward's output and final k-space, so that the loss of the same training step
    reads the predicted measurements without running the cascades again. Not copied with the
    model (``copy.deepcopy`` of a module holding non-leaf tensors would fail)."""

    __slots__ = ("x", "k")

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.k: torch.Tensor | None = None

    def __deepcopy__(self, memo) -> "_LastKspace":
        return _LastKspace()


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VarNetConfig:
    num_cascades: int = 12
    chans: int = 18
    pools: int = 4
    # the sensitivity network (E2E-VarNet only; the VarNet uses the given maps)
    sens_chans: int = 8
    sens_pools: int = 4
    mask_center: bool = True


PRESETS = {
    "paper": VarNetConfig(num_cascades=8, chans=18, pools=4),
    "fastmri": VarNetConfig(),
    "small": VarNetConfig(num_cascades=4, chans=8, pools=3, sens_chans=4, sens_pools=3),
    "tiny": VarNetConfig(num_cascades=2, chans=4, pools=2, sens_chans=2, sens_pools=2),
}


class VarNet(Reconstructor):
    """Unrolled variational network; with ``learn_maps`` (E2E-VarNet) it estimates its coil maps."""

    reference = "rss"

    def supervised_pair(self, x_net, batch):
        # Scored against reconstruction_rss: the model learns its magnitude on its crop.
        return center_crop(x_net.abs(), tuple(batch.target.shape[-2:])), batch.target

    def distillation_pair(self, x_net, teacher_out):
        # The output is fastMRI's magnitude; the phase it carries (for the data-fidelity term) is
        # not what it is trained or scored on, so the student learns the magnitude.
        return x_net.abs(), teacher_out.abs()

    def __init__(self, cfg: VarNetConfig, learn_maps: bool):
        super().__init__()
        self.cfg = cfg
        if learn_maps:
            self.sens_net = SensitivityModel(cfg.sens_chans, cfg.sens_pools, mask_center=cfg.mask_center)
        self.cascades = nn.ModuleList([VarNetBlock(NormUnet(cfg.chans, cfg.pools)) for _ in range(cfg.num_cascades)])
        self._last = _LastKspace()

    @property
    def learns_maps(self) -> bool:
        return hasattr(self, "sens_net")

    # -- the seams ---------------------------------------------------------------------------
    def priors(self) -> dict[str, nn.Module]:
        return {f"cascade{i}": c.model.unet for i, c in enumerate(self.cascades)}

    def set_prior(self, name: str, module: nn.Module) -> None:
        index = self._index(name)
        self.cascades[index].model.unet = module

    def prior_example_input(self, name: str, height: int = 64, width: int = 64) -> torch.Tensor:
        self._index(name)
        return torch.randn(1, 2, padded_size(height), padded_size(width))

    def prior_output_layers(self, name: str) -> list[nn.Module]:
        return [self.priors()[name].output_conv]

    def _index(self, name: str) -> int:
        if not name.startswith("cascade") or not name[7:].isdigit() or int(name[7:]) >= len(self.cascades):
            raise KeyError(name)
        return int(name[7:])

    def coil_maps(self, y: torch.Tensor, physics: MultiCoilMRI) -> torch.Tensor:
        """The maps the cascades use: estimated (E2E-VarNet) or the operator's (VarNet)."""
        if self.learns_maps:
            return self.sens_net(y, physics.mask.expand(y.shape[0], -1, -1, -1))
        return physics.smaps

    def measurement_operator(self, y: torch.Tensor, physics: MultiCoilMRI) -> MultiCoilMRI:
        if not self.learns_maps:
            return physics
        with torch.no_grad():
            return MultiCoilMRI(physics.mask, self.coil_maps(y, physics))

    def predicted_measurements(self, x: torch.Tensor, y: torch.Tensor, physics: MultiCoilMRI) -> torch.Tensor:
        """``M k``: the final multi-coil k-space (the VarNet's native output) under the mask. ``x``
        is this model's output for ``y``; the k-space of that forward pass is reused (no second
        pass), else recomputed."""
        k = self._last.k if self._last.x is x else self.predict_kspace(y, physics)[0]
        return physics.mask * k

    # -- the loop ----------------------------------------------------------------------------
    def predict_kspace(self, y: torch.Tensor, physics: MultiCoilMRI) -> tuple[torch.Tensor, torch.Tensor]:
        """Final multi-coil k-space and the coil maps used."""
        if y.shape != physics.smaps.shape:
            raise SpadeError(f"k-space {tuple(y.shape)} does not match coil maps {tuple(physics.smaps.shape)}")
        maps = self.coil_maps(y, physics)
        k = y
        for cascade in self.cascades:
            k = cascade(k, y, physics.mask, maps)
        return k, maps

    def forward(self, y: torch.Tensor, physics: MultiCoilMRI, **_) -> torch.Tensor:
        """Complex (B, H, W): magnitude = RSS of the final coil images (fastMRI's output), phase of
        their combination with the coil maps."""
        k, maps = self.predict_kspace(y, physics)
        coils = ifft2c(k)
        magnitude = coils.abs().pow(2).sum(dim=1).sqrt()
        combined = (coils * maps.conj()).sum(dim=1)
        phase = torch.where(combined.abs() > 0, combined / combined.abs().clamp_min(1e-30), torch.ones_like(combined))
        x = magnitude * phase
        self._last.x, self._last.k = x, k
        return x


def build_varnet(cfg: VarNetConfig) -> VarNet:
    return VarNet(cfg, learn_maps=False)


def build_e2e_varnet(cfg: VarNetConfig) -> VarNet:
    return VarNet(cfg, learn_maps=True)


# ---------------------------------------------------------------------------------------------
# fastMRI checkpoints
# ---------------------------------------------------------------------------------------------
def config_from_state_dict(state: dict[str, torch.Tensor]) -> VarNetConfig:
    """The architecture of a fastMRI VarNet state dict, read from its keys and shapes."""
    def unet_size(prefix: str) -> tuple[int, int]:
        first = state.get(f"{prefix}.down_sample_layers.0.layers.0.weight")
        if first is None:
            raise SpadeError(f"not a fastMRI VarNet state dict (no {prefix}.down_sample_layers.0)")
        pools = len({k.split(".")[len(prefix.split(".")) + 1] for k in state if k.startswith(f"{prefix}.down_sample_layers.")})
        return int(first.shape[0]), pools

    cascades = sorted({int(k.split(".")[1]) for k in state if k.startswith("cascades.")})
    if not cascades or cascades != list(range(len(cascades))):
        raise SpadeError("not a fastMRI VarNet state dict (no cascades.N.* keys)")
    chans, pools = unet_size("cascades.0.model.unet")
    sens_chans, sens_pools = unet_size("sens_net.norm_unet.unet") if any(k.startswith("sens_net.") for k in state) else (8, 4)
    return VarNetConfig(num_cascades=len(cascades), chans=chans, pools=pools, sens_chans=sens_chans, sens_pools=sens_pools)


def load_fastmri_checkpoint(
    path: str | Path, model: str = "e2e-varnet", expect: VarNetConfig | None = None
) -> tuple[VarNet, dict]:
    """A VarNet / E2E-VarNet from a fastMRI checkpoint, unchanged: a plain state dict
    (``torch.save(VarNet().state_dict())``, e.g. the brain leaderboard file) or a PyTorch-Lightning
    ``.ckpt`` (``state_dict`` with ``varnet.`` prefixes). Read with ``weights_only=True``: nothing
    in the file is executed. ``model="varnet"`` drops the sensitivity network (the given coil maps
    replace it). ``expect``: refuse an architecture other than this one."""
    if model not in ("varnet", "e2e-varnet"):
        raise SpadeError(f"fastMRI checkpoints hold a varnet or e2e-varnet, not {model!r}")
    try:
        with warnings.catch_warnings():  # torch warns of pickle protocols before refusing a file
            warnings.simplefilter("ignore")
            obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SpadeError(f"checkpoint {path} not found") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling refusal or corrupt file
        detail = str(exc).splitlines()[0] if str(exc).strip() else "empty or truncated file"
        raise SpadeError(f"{path} is not a loadable PyTorch state dict ({type(exc).__name__}: {detail})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if (not isinstance(state, dict) or not state or not all(isinstance(k, str) for k in state)
            or not all(torch.is_tensor(v) for v in state.values())):
        raise SpadeError(f"{path} does not hold a state dict of tensors")
    if any(k.startswith("varnet.") for k in state):  # fastMRI's Lightning module wraps the model
        state = {k[len("varnet."):]: v for k, v in state.items() if k.startswith("varnet.")}
    try:
        cfg = config_from_state_dict(state)
    except (IndexError, ValueError, TypeError) as exc:
        raise SpadeError(f"{path} is not a fastMRI VarNet state dict ({type(exc).__name__}: {exc})") from None
    if expect is not None and (cfg.num_cascades, cfg.chans, cfg.pools) != (expect.num_cascades, expect.chans, expect.pools):
        raise SpadeError(
            f"{path} has {cfg.num_cascades} cascades of U-Nets with {cfg.chans} channels and {cfg.pools} pools; "
            f"expected {expect.num_cascades} / {expect.chans} / {expect.pools}"
        )
    dropped = []
    if model == "varnet":
        dropped = sorted(k for k in state if k.startswith("sens_net."))
        state = {k: v for k, v in state.items() if not k.startswith("sens_net.")}
    elif not any(k.startswith("sens_net.") for k in state):
        raise SpadeError(f"{path} has no sensitivity network; load it as --model varnet (with given coil maps)")
    net = build_model(model, config=cfg)
    load_state(net, state, where=str(path))
    return net, {"source": str(path), "format": "fastmri", "dropped_keys": len(dropped)}


def import_fastmri(path: Path, model: str, expect: VarNetConfig | None = None) -> tuple[VarNet, dict, str]:
    """``spade import`` of a fastMRI checkpoint (:func:`load_fastmri_checkpoint`), with a summary line."""
    net, info = load_fastmri_checkpoint(path, model, expect=expect)
    cfg = net.cfg
    summary = (f"{model}: {cfg.num_cascades} cascades, U-Nets of {cfg.chans} channels / {cfg.pools} pools, "
               f"{count_parameters(net):,} parameters"
               + (f"; {info['dropped_keys']} sensitivity-network tensors dropped (coil maps given)" if info["dropped_keys"] else ""))
    return net, info, summary


# The demo (small preset): supervised training of the base on the training split. Fine-tuning runs a
# few epochs at lr 3e-3 instead of the paper's 1e-5 over far longer runs (on the embedded data 3e-3
# recovered more than 1e-3 at ratio 0.4; benchmarks/README.md, VarNet).
VARNET_DEMO = DemoRecipe(
    preset="small",
    train=TrainConfig(epochs=10, lr=3e-3, batch_size=2),
    finetune={
        "supervised": TrainConfig(epochs=2, lr=3e-3),
        "school": TrainConfig(epochs=5, lr=3e-3),
        "self-supervised": TrainConfig(epochs=3, lr=3e-3),
    },
)
E2E_VARNET_DEMO = DemoRecipe(
    preset="small",
    train=TrainConfig(epochs=4, lr=3e-3),
    finetune={
        "supervised": TrainConfig(epochs=1, lr=3e-3),
        "school": TrainConfig(epochs=3, lr=3e-3),
        # 3e-4: the best self-supervised rate of the sweep at ratio 0.4 (benchmarks/README.md).
        "self-supervised": TrainConfig(epochs=2, lr=3e-4),
    },
)

register_model("varnet", VarNetConfig, PRESETS, default_preset="small", task="mri", importer=import_fastmri,
               demo=VARNET_DEMO)(build_varnet)
register_model("e2e-varnet", VarNetConfig, PRESETS, default_preset="small", task="mri", importer=import_fastmri,
               demo=E2E_VARNET_DEMO)(build_e2e_varnet)
