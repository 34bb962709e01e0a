"""Hardware-aware widths and latency-targeted pruning, with injected timers (deterministic): which
width each group keeps, what the manifest records, that the search reports what it measured."""

import json

import pytest
import torch
from typer.testing import CliRunner

from spade_deploy.checkpoint import load_model, save_model
from cli.main import app
from spade_deploy.errors import SpadeError
from spade_deploy.hwaware import ConvKind, DeviceTimer, conv_kinds
from spade_deploy.timing import interleaved_medians
from spade_deploy.models import build_model, layer_shapes
from spade_deploy.prune import count_macs, prune_checkpoint, prune_model, search_speedup

runner = CliRunner()


class MacTimer:
    """Latency proportional to MACs; ``fast`` makes convolutions whose pruned widths are multiples
    of 8 run each MAC twice as fast (the 2-channel prior ends do not count)."""

    device = "mock"

    def __init__(self, fast: bool = False):
        self.fast = fast
        self.seen: list[ConvKind] = []

    def conv_seconds(self, kinds):
        kinds = list(kinds)
        self.seen += kinds
        aligned = lambda k: all(c % 8 == 0 or c <= 2 for c in (k.in_ch, k.out_ch))  # noqa: E731
        return {k: k.macs * 1e-12 * (0.5 if self.fast and aligned(k) else 1.0) for k in kinds}

    def prior_seconds(self, models, size):
        return {label: 1e-12 * sum(count_macs(p, m.prior_example_input(n, *size)) for n, p in m.priors().items())
                for label, m in models.items()}


def _small():
    torch.manual_seed(0)
    return build_model("deq", preset="small").eval()


def _widths(model):
    return {w for shape in layer_shapes(model.prior).values() for w in shape if w > 2}


def test_auto_widths_take_the_faster_nearby_width_and_keep_the_paper_count_otherwise():
    model = _small()
    paper, _ = prune_model(model, 0.4)
    assert _widths(paper) == {19}  # int(32 * 0.6)

    timer = MacTimer(fast=True)
    hw, report = prune_model(model, 0.4, "auto", timer=timer, measure_size=(40, 40))
    assert _widths(hw) == {16}  # within 20 % below 19 and twice as fast per MAC
    groups = report.priors[0].groups
    assert len(groups) == 5  # the residual trunk and the 4 blocks' inner channels
    # the widths near the paper's count, and the whole group's (what the choice must beat)
    assert all(g.paper == 19 and g.chosen == 16 and set(g.ms) == {*range(16, 23), 32} for g in groups)
    assert {(k.height, k.width) for k in timer.seen} == {(40, 40)}  # timed at the measuring size

    # Time proportional to MACs: no width is faster per MAC, so the paper's count stays, exactly.
    same, report = prune_model(model, 0.4, "auto", timer=MacTimer(), measure_size=(40, 40))
    assert all(g.chosen == 19 for g in report.priors[0].groups)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), paper.state_dict().values()))


def test_auto_widths_stay_within_the_tolerance_and_take_the_fastest_of_the_efficient_ones():
    _, report = prune_model(_small(), 0.05, "auto", timer=MacTimer(fast=True), measure_size=(24, 24))
    # paper 30 of 32: 24 and 32 are both twice as fast per MAC; 24 is faster in all, none goes below 24
    assert {g.chosen for g in report.priors[0].groups} == {24}
    assert all(min(g.ms) >= 24 and max(g.ms) <= 32 for g in report.priors[0].groups)


class OverheadBound(MacTimer):
    """A fixed cost per convolution call dominates (small images): wider runs each MAC cheaper and
    is slower in all."""

    def conv_seconds(self, kinds):
        return {k: self.overhead + v for k, v in super().conv_seconds(kinds).items()}

    overhead = 2e-6  # about a 32 -> 32 convolution's MACs at 24 x 24


def test_auto_widths_are_never_slower_than_the_paper_count():
    _, report = prune_model(_small(), 0.4, "auto", timer=OverheadBound(), measure_size=(24, 24))
    groups = report.priors[0].groups
    assert all(g.chosen <= g.paper and g.ms[g.chosen] <= g.ms[g.paper] for g in groups)
    # where the fixed cost is everything, no narrower width pays against the whole group: kept whole
    whole = OverheadBound()
    whole.overhead = 1e-3
    _, report = prune_model(_small(), 0.4, "auto", timer=whole, measure_size=(24, 24))
    assert all(g.chosen == 32 for g in report.priors[0].groups) and report.buys_nothing


class SlightlyFaster(MacTimer):
    """17-wide convolutions 3 % faster per MAC: within the measurement's margin."""

    def conv_seconds(self, kinds):
        return {k: v * (0.97 if 17 in (k.in_ch, k.out_ch) else 1.0) for k, v in super().conv_seconds(kinds).items()}


def test_auto_widths_ignore_differences_within_the_margin():
    _, report = prune_model(_small(), 0.4, "auto", timer=SlightlyFaster(), measure_size=(24, 24))
    assert {g.chosen for g in report.priors[0].groups} == {19}


def test_variants_get_their_own_files_and_manifests(tmp_path):
    src = save_model(tmp_path / "best.safetensors", _small())
    (paper_path, paper_rep), = prune_checkpoint(src, [0.4], tmp_path / "pruned")
    (hw_path, hw_rep), = prune_checkpoint(src, [0.4], tmp_path / "pruned", "auto", timer=MacTimer(fast=True),
                                          measure_size=(32, 32))
    (r8_path, _), = prune_checkpoint(src, [0.4], tmp_path / "pruned", 8)
    assert (paper_path.name, hw_path.name, r8_path.name) == (
        "best.pruned-0.4.safetensors", "best.pruned-0.4.hw.safetensors", "best.pruned-0.4.round8.safetensors")
    _, pm = load_model(paper_path)
    model, hm = load_model(hw_path)
    _, rm = load_model(r8_path)
    assert pm["pruning"]["widths"] == "paper" and "hardware" not in pm["pruning"]
    assert rm["pruning"]["widths"] == "round-to 8"
    p = hm["pruning"]
    assert p["widths"] == "auto" and p["ratio"] == 0.4 and p["parent"] == str(src)
    assert p["params_after"] == hw_rep.params_after < paper_rep.params_after
    assert p["macs_after"] < pm["pruning"]["macs_after"]
    groups = p["hardware"]["groups"]["prior"]
    assert p["hardware"]["input"] == [32, 32] and p["hardware"]["device"] == "mock"
    assert all(g["paper"] == 19 and g["chosen"] == 16 and len(g["ms"]) == 8 for g in groups)
    assert p["hardware"]["buys_nothing"] is False and p["hardware"]["gain"] > 0.4  # measured on the priors
    assert p["parent_widths"]["prior"]["head"] == [2, 32]  # the unpruned widths, per layer
    assert _widths(model) == {16}


def test_latency_search_reports_the_measured_speedup():
    model = _small()
    pruned, report = search_speedup(model, 2.0, timer=MacTimer(), size=(32, 32))
    s = report.speedup
    assert s is not None and s.target == 2.0 and s.reached
    assert abs(s.speedup / 2 - 1) <= 0.05
    assert s.unpruned_ms / s.pruned_ms == pytest.approx(s.speedup)
    # the speed-up it reports is the one of the model it returns
    macs = lambda m: count_macs(m.prior, m.prior_example_input("prior", 32, 32))  # noqa: E731
    assert macs(model) / macs(pruned) == pytest.approx(s.speedup)
    assert report.ratio == s.ratio and (s.ratio, s.speedup) in s.tried
    entry = report.manifest_entry("src")
    assert entry["target_speedup"]["speedup"] == pytest.approx(s.speedup, rel=1e-3)
    json.dumps(entry)

    # with measured widths too (here multiples of 8: 24 of 32 filters is x1.78 in MACs)
    _, hw = search_speedup(model, 1.7, "auto", timer=MacTimer(fast=True), size=(32, 32))
    assert hw.speedup.reached and hw.widths == "auto" and hw.speedup.speedup == pytest.approx(32**2 / 24**2, rel=0.02)
    # a target the model cannot reach is reported as such, not hidden
    _, far = search_speedup(model, 1e4, timer=MacTimer(), size=(32, 32), max_steps=3)
    assert not far.speedup.reached and far.speedup.speedup > 1
    with pytest.raises(SpadeError, match="greater than 1"):
        search_speedup(model, 0.5, timer=MacTimer())


class MacClock:
    """A clock that advances one nanosecond per multiply-accumulate of every convolution run while it
    is installed (a global forward hook): what a timer measures through it is the MACs its timed
    calls ran, whatever the machine's speed."""

    def __init__(self):
        self.now, self.convs = 0.0, 0

    def __call__(self) -> float:
        return self.now

    def _hook(self, module, inputs, _out):
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            n, _, h, w = inputs[0].shape
            kind = ConvKind(module.in_channels, module.out_channels, tuple(module.kernel_size), tuple(module.stride),
                            tuple(module.padding), tuple(module.dilation), module.groups,
                            isinstance(module, torch.nn.ConvTranspose2d), h, w)
            self.now += n * kind.macs * 1e-9
            self.convs += 1

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_conv_kinds_and_device_timer():
    """DeviceTimer runs each convolution kind at its widths and input size, one call per timed
    interval (through a MAC-counting clock every kind takes exactly its MACs), times each kind once
    (cached), and times each model's priors in one pass."""
    model = _small()
    prior = model.prior
    kinds = conv_kinds(prior, torch.randn(1, 2, 20, 24))
    assert {(k.in_ch, k.out_ch, k.height, k.width) for k in kinds.values()} >= {(2, 32, 20, 24), (32, 2, 20, 24)}
    head = kinds[prior.head]
    assert head.macs == 20 * 24 * 32 * 2 * 9
    with MacClock() as clock:
        timer = DeviceTimer("cpu", repeats=3, warmup=1, clock=clock)
        narrow = head.with_widths(out_ch=16)
        seconds = timer.conv_seconds([head, narrow])
        assert seconds == {head: pytest.approx(head.macs * 1e-9), narrow: pytest.approx(narrow.macs * 1e-9)}
        assert clock.convs == 2 * (1 + 3)  # each kind: a warm-up round and three timed ones
        block = kinds[prior.blocks[0].conv1]
        assert timer.conv_seconds([head, block]) == {head: seconds[head], block: pytest.approx(block.macs * 1e-9)}
        assert clock.convs == 8 + 4 and len(timer.cache) == 3  # only the new kind was run
        pruned, _ = prune_model(model, 0.4)
        priors = timer.prior_seconds({"unpruned": model, "pruned": pruned}, (32, 32))
        macs = {label: sum(k.macs for k in conv_kinds(m.prior, torch.randn(1, 2, 32, 32)).values())
                for label, m in (("unpruned", model), ("pruned", pruned))}
    assert priors == {label: pytest.approx(m * 1e-9) for label, m in macs.items()}
    calls = []
    interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, warmup=1)
    assert calls == ["a", "b"] * 3  # one call of each per round


def test_prune_cli_target_speedup_and_bad_options(tmp_path, monkeypatch):
    """`spade prune --target-speedup` searches with the device timer at --size and records what it
    measured; here the timer reads the MAC clock, so the measured speed-up is the priors' MAC ratio
    on any machine."""
    import spade_deploy.pipeline as pipeline
    import spade_deploy.prune as prune

    clock = MacClock()
    for module in (prune, pipeline):  # the command's timer comes through the pipeline
        monkeypatch.setattr(module, "default_timer", lambda device=None: DeviceTimer(device or "cpu", clock=clock))
    model = build_model("deq", preset="tiny")
    src = save_model(tmp_path / "m.safetensors", model)
    with clock:
        res = runner.invoke(app, ["prune", str(src), "--target-speedup", "1.5", "--size", "32", "--device", "cpu",
                                  "-o", str(tmp_path / "p")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    pruned, manifest = load_model(tmp_path / "p" / "m.pruned-x1.5.safetensors")
    t = manifest["pruning"]["target_speedup"]
    macs = [sum(k.macs for k in conv_kinds(m.prior, torch.randn(1, 2, 32, 32)).values()) for m in (model, pruned)]
    assert t["speedup"] == pytest.approx(macs[0] / macs[1], abs=1e-4)  # the model written is the one measured
    assert abs(t["speedup"] / 1.5 - 1) <= 0.05  # the search's stopping rule: within 5 % of the target
    assert t["unpruned_ms"] == pytest.approx(macs[0] * 1e-6, abs=1e-4) and t["input"] == [32, 32] and t["device"] == "cpu"
    assert f"measured prior speed-up x{t['speedup']:.2f}" in res.output
    assert manifest["pruning"]["widths"] == "paper" and manifest["pruning"]["ratio"] == t["ratio"]

    for args, msg in ((["--round-to", "x"], "positive integer or 'auto'"),
                      (["--round-to", "0"], "positive integer or 'auto'"),
                      (["--target-speedup", "2", "-r", "0.4"], "either --ratio or --target-speedup"),
                      (["--target-speedup", "0.9"], "greater than 1"),
                      (["--round-to", "auto", "--device", "tpu"], "unknown device")):
        res = runner.invoke(app, ["prune", str(src), *args, "-o", str(tmp_path / "q")])
        assert res.exit_code == 1 and "error:" in res.output and msg in res.output, (args, res.output)
        assert "Traceback" not in res.output


def test_auto_widths_leave_a_module_kept_in_pytorch_at_the_paper_count():
    """USRNet's hyper-parameter MLP is pruned with the ResUNet but never deployed: its widths stay
    the paper's, only the deployed prior's are measured."""
    torch.manual_seed(0)
    model = build_model("usrnet", preset="small").eval()
    paper, _ = prune_model(model, 0.4)
    hw, report = prune_model(model, 0.4, "auto", timer=MacTimer(fast=True), measure_size=(32, 32))
    assert layer_shapes(hw.h) == layer_shapes(paper.h)
    assert [p.name for p in report.priors if p.groups] == ["prior"]  # the ResUNet's groups were timed


class WholeIsFastest(MacTimer):
    """A CPU whose kernels run any convolution writing or reading fewer than 32 channels (but more
    than 2) at 32's cost or more (issue 27: 19 and 26 of 32 filters slower than all 32)."""

    def conv_seconds(self, kinds):
        def cost(k):
            full = k.with_widths(in_ch=32 if 2 < k.in_ch < 32 else k.in_ch, out_ch=32 if 2 < k.out_ch < 32 else k.out_ch)
            narrow = k != full
            return full.macs * 1e-12 * (1.1 if narrow else 1.0)
        return {k: cost(k) for k in kinds}

    def prior_seconds(self, models, size):
        return {label: sum(sum(self.conv_seconds(list(conv_kinds(p, m.prior_example_input(n, *size)).values())).values())
                           for n, p in m.priors().items()) for label, m in models.items()}


def test_auto_widths_keep_the_group_whole_where_no_narrower_width_pays(tmp_path):
    """Where every width below the parent's runs slower than the parent's, --round-to auto keeps
    every group whole, and the ratio is reported as buying nothing (manifest and CLI line)."""
    model = _small()
    pruned, report = prune_model(model, 0.2, "auto", timer=WholeIsFastest(), measure_size=(24, 24))
    assert all(g.chosen == g.channels == 32 for g in report.priors[0].groups)
    assert layer_shapes(pruned.prior) == layer_shapes(model.prior)
    assert report.buys_nothing and "ratio 0.2 buys nothing on mock" in report.verdict()
    entry = report.manifest_entry("src")
    assert entry["hardware"]["buys_nothing"] is True
    # where the narrower widths pay, the ratio buys something and says nothing
    _, fast = prune_model(model, 0.4, "auto", timer=MacTimer(fast=True), measure_size=(24, 24))
    assert not fast.buys_nothing and fast.verdict() is None and fast.gain > 0.03


def test_prune_cli_says_which_ratios_buy_nothing(tmp_path, monkeypatch):
    import spade_deploy.pipeline as pipeline

    monkeypatch.setattr(pipeline, "default_timer", lambda device=None: WholeIsFastest())
    src = save_model(tmp_path / "m.safetensors", _small())
    res = runner.invoke(app, ["prune", str(src), "-r", "0.1", "-r", "0.4", "--round-to", "auto", "--size", "24",
                              "-o", str(tmp_path / "p")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if "buys nothing" in line]
    assert len(lines) == 2 and lines[0].startswith("ratio 0.1 buys nothing") and lines[1].startswith("ratio 0.4")
    _, manifest = load_model(tmp_path / "p" / "m.pruned-0.4.hw.safetensors")
    assert manifest["pruning"]["hardware"]["buys_nothing"] is True
