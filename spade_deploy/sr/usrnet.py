"""USRNet (Zhang, Van Gool, Timofte, CVPR 2020): deep unfolding network for image super-resolution.

Half-quadratic splitting of ``min_x ||y - S H x||^2 / (2 sigma^2) + lambda Phi(x)`` unrolled for
``n_iter`` iterations, each a data step and a prior step::

    z_k = D(x_{k-1}, y, k, s, alpha_k)   the closed-form FFT solution (SRPhysics.data_step)
    x_k = P([z_k, beta_k])               the ResUNet denoiser on the image + a noise-level map

``x_0`` is the nearest-neighbour upsampling of ``y`` (the official model's; ``init="bicubic"``:
bicubic upsampling on the downsampler's grid, :func:`~spade_deploy.sr.baseline.bicubic_upsample`);
``(alpha_k, beta_k)`` come from the hyper-parameter module, a small MLP of ``(sigma, s)``. Three
modules, as in the paper:

* data module ``D``: no parameters (:mod:`spade_deploy.sr.physics`);
* prior module ``P`` (``self.p``): the ResUNet shared by every iteration (4 levels, strided 2 x 2
  convolutions down, transposed 2 x 2 convolutions up, ``nb`` residual blocks per level, additive
  skips, no biases). Its input is 4 channels (RGB + the ``beta_k`` map), its output RGB. It is the
  only prior, the only pruned and exported module;
* hyper-parameter module ``H`` (``self.h``): three 1 x 1 convolutions, ReLU, Softplus (+1e-6);
  stays in PyTorch (never exported). Its hidden widths are pruned with the ResUNet, as Table 4's
  counts require (:meth:`USRNet.prunable`).

Module names and tensor shapes follow the official ``models/network_usrnet_v1.py`` of cszn/USRNet
(KAIR), so a state dict saved from it (``usrnet.pth``, ``usrnet_tiny.pth``) loads strictly
(:func:`load_official_checkpoint`, ``spade import usrnet.pth -m usrnet``). Differences that leave
the numbers unchanged: ReLUs are not in-place (torch-pruning 1.6.1 mis-traces in-place ops), and
the ResUNet's padding of H and W to multiples of 8 (replicate, bottom / right, cropped after) is
done by the loop around the prior instead of inside it, so the exported prior is a plain
convolutional network with dynamic H / W that takes multiples of 8.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpadeError
from .baseline import bicubic_upsample
from .physics import SRPhysics
from ..models import DemoRecipe, Reconstructor, build_model, count_parameters, load_state, register_model
from ..train import TrainConfig

PAD_MULTIPLE = 8  # three stride-2 levels


def padded_size(n: int) -> int:
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


def _chain(*modules: nn.Module) -> nn.Module:
    """The official code's ``basicblock.sequential``: a single module stays bare (its parameters
    have no index in the state dict), several form an ``nn.Sequential``."""
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)


class ResBlock(nn.Module):
    """``x + conv(relu(conv(x)))``, 3 x 3, no bias (``res.0`` / ``res.2`` as in the official keys)."""

    def __init__(self, channels: int):
        super().__init__()
        self.res = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res(x)


class ResUNet(nn.Module):
    """The prior: ``(B, in_nc, H, W) -> (B, out_nc, H, W)`` for H, W multiples of 8."""

    def __init__(self, in_nc: int = 4, out_nc: int = 3, nc=(64, 128, 256, 512), nb: int = 2):
        super().__init__()
        if len(nc) != 4:
            raise SpadeError(f"ResUNet takes 4 level widths, got {list(nc)}")

        def blocks(c: int) -> list[nn.Module]:
            return [ResBlock(c) for _ in range(nb)]

        def down(a: int, b: int) -> nn.Module:
            return nn.Conv2d(a, b, 2, stride=2, bias=False)

        def up(a: int, b: int) -> nn.Module:
            return nn.ConvTranspose2d(a, b, 2, stride=2, bias=False)

        self.m_head = nn.Conv2d(in_nc, nc[0], 3, padding=1, bias=False)
        self.m_down1 = _chain(*blocks(nc[0]), down(nc[0], nc[1]))
        self.m_down2 = _chain(*blocks(nc[1]), down(nc[1], nc[2]))
        self.m_down3 = _chain(*blocks(nc[2]), down(nc[2], nc[3]))
        self.m_body = _chain(*blocks(nc[3]))
        self.m_up3 = _chain(up(nc[3], nc[2]), *blocks(nc[2]))
        self.m_up2 = _chain(up(nc[2], nc[1]), *blocks(nc[1]))
        self.m_up1 = _chain(up(nc[1], nc[0]), *blocks(nc[0]))
        self.m_tail = nn.Conv2d(nc[0], out_nc, 3, padding=1, bias=False)

    @property
    def tail(self) -> nn.Conv2d:
        return self.m_tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.m_head(x)
        x2 = self.m_down1(x1)
        x3 = self.m_down2(x2)
        x4 = self.m_down3(x3)
        x = self.m_body(x4)
        x = self.m_up3(x + x4)
        x = self.m_up2(x + x3)
        x = self.m_up1(x + x2)
        return self.m_tail(x + x1)


class HyPaNet(nn.Module):
    """``(sigma, s) -> (alpha_1..alpha_n, beta_1..beta_n)``, positive (Softplus + 1e-6)."""

    def __init__(self, in_nc: int = 2, out_nc: int = 16, channels: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Conv2d(in_nc, channels, 1, bias=True),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=True),
            nn.ReLU(),
            nn.Conv2d(channels, out_nc, 1, bias=True),
            nn.Softplus(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + 1e-6


@dataclass(frozen=True)
class USRNetConfig:
    n_iter: int = 8
    h_nc: int = 64
    nc: tuple[int, ...] = (64, 128, 256, 512)
    nb: int = 2
    in_nc: int = 4
    out_nc: int = 3
    init: str = "nearest"  # x_0: "nearest" (official) | "bicubic" (aligned with the downsampler)

    def __post_init__(self):
        object.__setattr__(self, "nc", tuple(int(c) for c in self.nc))  # JSON gives a list back
        if self.init not in INITS:
            raise SpadeError(f"unknown USRNet initialisation {self.init!r}: {' | '.join(INITS)}")


INITS = {"nearest": lambda y, s: F.interpolate(y, scale_factor=s, mode="nearest"), "bicubic": bicubic_upsample}


PRESETS = {
    # The paper's (and the official usrnet.pth): 17,016,016 parameters.
    "paper": USRNetConfig(),
    # The official usrnet_tiny.pth: 590,332 parameters.
    "tiny": USRNetConfig(n_iter=6, h_nc=32, nc=(16, 32, 64, 64)),
    # CPU-trainable: tiny's widths with one residual block per level and 4 iterations (322,936
    # parameters, 37 % of tiny's prior MACs per forward pass), all four ResUNet levels kept. It
    # starts from the bicubic estimate: in 4 iterations from the nearest-neighbour one, a base
    # trained alike lost more to bicubic upsampling with the narrowest Gaussian (k1, width 0.7) at
    # x3 / x4. Trained in the package (spade_deploy/weights/usrnet-small.safetensors,
    # usrnet.DEMO).
    "small": USRNetConfig(n_iter=4, h_nc=32, nc=(16, 32, 64, 64), nb=1, init="bicubic"),
}


class USRNet(Reconstructor):
    """``model(y, physics) -> x``: low-resolution ``(B, 3, h, w)`` in ``[0, 1]`` -> ``(B, 3, s h, s w)``."""

    reference = "hr"  # scored against the high-resolution image itself

    def __init__(self, cfg: USRNetConfig):
        super().__init__()
        self.cfg = cfg
        self.p = ResUNet(cfg.in_nc, cfg.out_nc, cfg.nc, cfg.nb)
        self.h = HyPaNet(in_nc=2, out_nc=2 * cfg.n_iter, channels=cfg.h_nc)
        self.n = cfg.n_iter

    # -- the seams ---------------------------------------------------------------------------
    def priors(self) -> dict[str, nn.Module]:
        return {"prior": self.p}

    def prunable(self) -> dict[str, nn.Module]:
        """The ResUNet and the hyper-parameter MLP. Table 4's pruned counts are those of both
        pruned at the ratio (the MLP's two hidden widths; its output layer kept): the ResUNet
        alone leaves 576 / 987 / 1,755 / 3,172 parameters more at 0.05 / 0.1 / 0.2 / 0.4, the MLP's
        share exactly. The MLP stays in PyTorch (not exported, not swapped)."""
        return {"prior": self.p, "hyper": self.h}

    def set_prior(self, name: str, module: nn.Module) -> None:
        if name == "prior":
            self.p = module
        elif name == "hyper":
            self.h = module
        else:
            raise KeyError(name)

    def prior_example_input(self, name: str, height: int = 64, width: int = 64) -> torch.Tensor:
        if name == "hyper":
            return torch.tensor([[[[0.0]], [[4.0]]]])  # (sigma, scale): (1, 2, 1, 1)
        if name != "prior":
            raise KeyError(name)
        return torch.randn(1, self.cfg.in_nc, padded_size(height), padded_size(width))

    def prior_output_layers(self, name: str) -> list[nn.Module]:
        if name == "hyper":
            return [self.h.mlp[4]]
        return [self.priors()[name].m_tail]

    # -- the loop ----------------------------------------------------------------------------
    def hyper_parameters(self, physics: SRPhysics, batch: int) -> torch.Tensor:
        """``(B, 2 n_iter, 1, 1)``: ``alpha_1..n`` then ``beta_1..n`` for the noise level and scale."""
        sigma = physics.sigma(batch).to(self.h.mlp[0].weight.dtype).view(-1, 1, 1, 1)
        scale = torch.full_like(sigma, float(physics.scale))
        return self.h(torch.cat([sigma, scale], dim=1))

    def prior_step(self, z: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """``P([z, beta])`` with H, W replicate-padded (bottom / right) to multiples of 8 and cropped."""
        h, w = z.shape[-2:]
        ph, pw = padded_size(h) - h, padded_size(w) - w
        inp = torch.cat([z, beta.expand(-1, 1, h, w)], dim=1)
        if ph or pw:
            inp = F.pad(inp, (0, pw, 0, ph), mode="replicate")
        return self.p(inp)[..., :h, :w]

    def forward(self, y: torch.Tensor, physics: SRPhysics, **_) -> torch.Tensor:
        if y.dim() != 4 or y.shape[1] != self.cfg.out_nc:
            raise SpadeError(f"USRNet takes (B, {self.cfg.out_nc}, h, w) low-resolution images, got {tuple(y.shape)}")
        s = physics.scale
        ab = self.hyper_parameters(physics, y.shape[0])
        x = INITS[self.cfg.init](y, s)
        terms = physics.data_terms(y)
        for i in range(self.n):
            x = physics.data_step(x, y, ab[:, i : i + 1], terms)
            x = self.prior_step(x, ab[:, self.n + i : self.n + i + 1])
        return x


def build_usrnet(cfg: USRNetConfig) -> USRNet:
    return USRNet(cfg)


# ---------------------------------------------------------------------------------------------
# Official checkpoints
# ---------------------------------------------------------------------------------------------
def config_from_state_dict(state: dict[str, torch.Tensor]) -> USRNetConfig:
    """The architecture of an official USRNet state dict, read from its keys and shapes."""
    head, tail, last = state.get("p.m_head.weight"), state.get("p.m_tail.weight"), state.get("h.mlp.4.weight")
    if head is None or tail is None or last is None or "h.mlp.0.weight" not in state:
        raise SpadeError("not a USRNet state dict (no p.m_head / p.m_tail / h.mlp weights)")
    nc = [int(head.shape[0])]
    for level in (1, 2, 3):
        down = [k for k in state if k.startswith(f"p.m_down{level}.") and state[k].dim() == 4 and state[k].shape[-1] == 2]
        if len(down) != 1:
            raise SpadeError(f"not a USRNet state dict (no single strided convolution in p.m_down{level})")
        nc.append(int(state[down[0]].shape[0]))
    nb = sum(1 for k in state if k.startswith("p.m_down1.") and k.endswith(".res.0.weight"))
    if nb == 0:
        raise SpadeError("not a USRNet state dict (no residual blocks in p.m_down1)")
    return USRNetConfig(n_iter=int(last.shape[0]) // 2, h_nc=int(state["h.mlp.0.weight"].shape[0]), nc=tuple(nc), nb=nb,
                        in_nc=int(head.shape[1]), out_nc=int(tail.shape[0]))


def load_official_checkpoint(path: str | Path, expect: USRNetConfig | None = None) -> tuple[USRNet, dict]:
    """A USRNet from an official state dict (``usrnet.pth``, ``usrnet_tiny.pth``), unchanged.
    Read with ``weights_only=True``: nothing in the file is executed. ``expect``: refuse another
    architecture."""
    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SpadeError(f"checkpoint {path} not found") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling refusal or corrupt file
        raise SpadeError(f"{path} is not a loadable PyTorch state dict ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise SpadeError(f"{path} does not hold a state dict of tensors")
    cfg = config_from_state_dict(state)  # the official loop: x_0 nearest-neighbour, whatever the preset's
    if expect is not None and dataclasses.replace(cfg, init=expect.init) != expect:
        raise SpadeError(f"{path} holds a USRNet with n_iter {cfg.n_iter}, h_nc {cfg.h_nc}, nc {list(cfg.nc)}, nb {cfg.nb}; "
                         f"expected n_iter {expect.n_iter}, h_nc {expect.h_nc}, nc {list(expect.nc)}, nb {expect.nb}")
    net = build_model("usrnet", config=cfg)
    load_state(net, state, where=str(path))
    return net, {"source": str(path), "format": "usrnet-official"}


def import_official(path: Path, model: str = "usrnet", expect: USRNetConfig | None = None) -> tuple[USRNet, dict, str]:
    """``spade import`` of an official USRNet state dict (:func:`load_official_checkpoint`), with a summary line."""
    net, info = load_official_checkpoint(path, expect=expect)
    cfg = net.cfg
    return net, info, (f"usrnet: {cfg.n_iter} iterations, ResUNet widths {list(cfg.nc)} x {cfg.nb} blocks, "
                       f"{count_parameters(net):,} parameters")


# The demo (small preset) on the embedded photographs: 48 x 48 training tiles degraded afresh at x2 /
# x3 / x4 with the 12 kernels; evaluation on the centre 192 x 192 of the test photographs. The base
# measures its error against bicubic's (relative_to="baseline"); only the paper's headline ratio
# 0.4 is pruned, so the whole run fits the quarter hour. The shipped base
# (spade_deploy/weights/usrnet-small.safetensors) was trained by `train`; its figures and the
# runs before: benchmarks/README.md (USRNet).
DEMO = DemoRecipe(
    preset="small",
    train=TrainConfig(epochs=30, lr=2e-3, lr_schedule="cosine", relative_to="baseline", batch_size=8),
    finetune={
        "supervised": TrainConfig(epochs=9, lr=2e-3, lr_schedule="cosine", batch_size=8, val_every=3),
        "school": TrainConfig(epochs=9, lr=2e-3, batch_size=2, val_every=3),
        "self-supervised": TrainConfig(epochs=1, lr=1e-3, batch_size=2),
    },
    task_options={"crop": 192, "patch": 48},
    ratios=(0.4,),
)

register_model("usrnet", USRNetConfig, PRESETS, default_preset="small", task="sr", importer=import_official,
               demo=DEMO)(build_usrnet)
