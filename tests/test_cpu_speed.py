"""Speed choices on CPUs: bf16 autocast training (mirseg.precision) and the layout probe and its cache (mirseg.layout).

The probe's logic is tested with a fake timer (any candidate's seconds are what the test says); one test runs
the real probe on a tiny network, one runs it through ``iter_predictions``. bf16 training runs on any CPU when
``MIRSEG_CPU_BF16=1`` forces it (emulated on a CPU without native bf16: slow, the same arithmetic).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import toy
from torch import nn

import mirseg.train
from mirseg import layout, machine, precision
from mirseg.checkpoint import atomic_save, make_checkpoint, read_checkpoint
from mirseg.config import InferConfig, MineConfig, TrainConfig, build_config
from mirseg.data.synthetic import make_dataset
from mirseg.errors import ConfigError
from mirseg.infer import iter_predictions, load_predictor
from mirseg.layout import Choice, choose
from mirseg.models import build_model
from mirseg.predict import prepare_for_inference
from mirseg.train import train

CPU = torch.device("cpu")
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own layout cache, and bf16 as the machine has it unless the test says otherwise."""
    monkeypatch.setenv("MIRSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MIRSEG_CPU_BF16", raising=False)


class FakeTimer:
    """A TimePass whose seconds per candidate name are given; it counts the passes it was asked for."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds = seconds
        self.calls: list[tuple[str, tuple[int, int]]] = []

    def __call__(self, c: Choice, size: tuple[int, int]) -> float:
        self.calls.append((c.name, size))
        return self.seconds[c.name]


def _entries() -> dict:
    return json.loads(layout.cache_file().read_text())


# ---------------------------------------------------------------------------------------------
# The choice: probe, cache, key, log


def test_the_probe_keeps_the_fastest_caches_it_and_says_so(caplog):
    timer = FakeTimer({"channels_last fp32": 0.52, "contiguous fp32": 0.41})
    with caplog.at_level(logging.INFO, logger="mirseg"):
        first = choose("hrnet_w18s", "infer", CPU, (1024, 2048), "auto", None, timer)
    assert (first.layout, first.dtype) == ("contiguous", None)
    assert {size for _, size in timer.calls} == {(352, 704)}  # 1024x2048 probed scaled down to <= 512x512 px
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("layout:"))
    assert line == (f"layout: contiguous fp32 for hrnet_w18s on {machine.cpu_signature()} (probe at 352x704: 0.41 s "
                    f"per image, against channels_last fp32 0.52 s; cached in {layout.cache_file()})")
    (key, entry), = _entries().items()
    assert key == layout.cache_key("hrnet_w18s", "infer", (1024, 2048), (None,))
    assert machine.cpu_signature() in key and f"torch {torch.__version__}" in key and "2^21 px" in key
    assert f"{torch.get_num_threads()} threads" in key
    assert entry["layout"] == "contiguous" and entry["probe"] == {"channels_last fp32": 0.52, "contiguous fp32": 0.41}

    # The same machine, network, task and size bucket: the cache answers, nothing is timed.
    again = FakeTimer({})
    second = choose("hrnet_w18s", "infer", CPU, (1000, 2000), "auto", None, again)
    assert (second.layout, again.calls) == ("contiguous", [])
    assert second.how == f"cached in {layout.cache_file()}"
    # Another network, task or size bucket is probed on its own.
    for args in (("fastscnn", "infer", (1024, 2048)), ("hrnet_w18s", "train", (1024, 2048)),
                 ("hrnet_w18s", "infer", (512, 1024))):
        timer = FakeTimer({"channels_last fp32": 0.1, "contiguous fp32": 0.2})
        assert choose(args[0], args[1], CPU, args[2], "auto", None, timer).layout == "channels_last"
        assert timer.calls
    assert len(_entries()) == 4


X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu avx512f avx512_bf16

processor\t: 1
cpu family\t: 23
model\t\t: 49
model name\t: AMD EPYC
"""

ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 2100.00
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd40

processor\t: 1
CPU implementer\t: 0x41
CPU part\t: 0xd0c
"""


def test_the_cache_tells_cpu_generations_apart_that_share_a_model_name(monkeypatch):
    # A VM names a Zen 2 and a Zen 4 EPYC alike; the numbers of the first processor tell them apart.
    assert machine.cpu_numbers(X86_CPUINFO) == "cpu family 25, model 17"
    assert machine.cpu_numbers(ARM_CPUINFO) == "CPU implementer 0x41, CPU part 0xd40"
    assert machine.cpu_numbers("processor\t: 0\nmodel name\t: Some CPU\n") == ""
    signature = machine.cpu_signature()
    assert signature.startswith(machine.cpu_model() + " (")
    assert torch.backends.cpu.get_cpu_capability() in signature
    assert ("native bf16" if machine.native_bf16() else "no native bf16") in signature
    key = layout.cache_key("fastscnn", "infer", (512, 512), (None,))
    machine.cpu_signature.cache_clear()
    native = machine.native_bf16()
    monkeypatch.setattr(machine, "native_bf16", lambda: not native)
    try:  # the same name without (or with) native bf16: another entry of the cache
        assert layout.cache_key("fastscnn", "infer", (512, 512), (None,)) != key
    finally:
        machine.cpu_signature.cache_clear()


def test_the_probe_warms_up_then_times_rounds_until_the_budget_is_spent():
    timer = FakeTimer({"channels_last fp32": 0.5, "contiguous fp32": 0.5})
    choose("fastscnn", "infer", CPU, (512, 512), "auto", None, timer, budget_s=2.0)
    # warm-up 1.0 s, a round 1.0 s: 2 s spent after one round (ties go to the first candidate)
    assert [name for name, _ in timer.calls] == ["channels_last fp32", "contiguous fp32"] * 2
    timer = FakeTimer({"channels_last fp32": 0.01, "contiguous fp32": 0.01})
    choose("fastscnn", "infer", CPU, (1024, 1024), "auto", None, timer, budget_s=2.0)  # another size bucket
    assert len(timer.calls) == 2 * (1 + layout.MAX_ROUNDS)  # a cheap network: at most MAX_ROUNDS rounds


def test_the_layout_key_a_gpu_a_tiny_input_or_a_resumed_run_are_not_probed(caplog):
    never = FakeTimer({})
    with caplog.at_level(logging.INFO, logger="mirseg"):
        keyed = choose("ocrnet_hr18s", "infer", CPU, (1024, 2048), "contiguous", None, never)
    assert (keyed.layout, keyed.how) == ("contiguous", "the layout key")
    assert "layout: contiguous fp32 for ocrnet_hr18s" in caplog.text
    assert choose("fastscnn", "infer", torch.device("cuda"), (1024, 2048), "auto", torch.float16, never) == \
        Choice("channels_last", torch.float16, "not probed on cuda")
    assert choose("fastscnn", "train", CPU, (64, 64), "auto", None, never).layout == "contiguous"  # too small
    kept = choose("fastscnn", "train", CPU, (512, 512), "auto", None, never, resumed=Choice("channels_last"))
    assert (kept.layout, kept.how) == ("channels_last", "as the run being resumed")
    assert never.calls == [] and not layout.cache_file().exists()
    with pytest.raises(ConfigError, match="layout must be one of auto, channels_last, contiguous, got 'nhwc'"):
        choose("fastscnn", "infer", CPU, (512, 512), "nhwc", None, never)
    for cls in (TrainConfig, InferConfig, MineConfig):  # as a key (YAML, command line)
        with pytest.raises(ConfigError, match="layout: 'nhwc' is not one of auto, channels_last, contiguous"):
            build_config(cls, {"layout": "nhwc"})


def test_a_broken_cache_is_probed_again_and_rewritten():
    layout.cache_file().parent.mkdir(parents=True)
    layout.cache_file().write_text("{not json")
    timer = FakeTimer({"channels_last fp32": 0.2, "contiguous fp32": 0.3})
    assert choose("fastscnn", "infer", CPU, (512, 1024), "auto", None, timer).layout == "channels_last"
    assert timer.calls and len(_entries()) == 1


def test_with_amp_on_a_bf16_cpu_the_probe_keeps_bf16_only_where_it_is_faster(monkeypatch):
    monkeypatch.setattr(machine, "native_bf16", lambda: True)
    dtype = precision.autocast_dtype(CPU, True)
    assert dtype == BF16
    fast_bf16 = FakeTimer({"channels_last fp32": 0.4, "contiguous fp32": 0.5, "channels_last bf16": 0.3,
                           "contiguous bf16": 0.2})
    picked = choose("hrnet_w18s", "infer", CPU, (512, 1024), "auto", dtype, fast_bf16)
    assert (picked.layout, picked.dtype) == ("contiguous", BF16) and len({n for n, _ in fast_bf16.calls}) == 4
    slow_bf16 = FakeTimer({"channels_last fp32": 0.2, "contiguous fp32": 0.5, "channels_last bf16": 0.3,
                           "contiguous bf16": 0.4})
    picked = choose("fastscnn", "infer", CPU, (512, 1024), "auto", dtype, slow_bf16)
    assert (picked.layout, picked.dtype) == ("channels_last", None)  # fp32 was faster: amp gives way
    # MIRSEG_CPU_BF16=1 asks for bf16 whatever its speed: only bf16 candidates.
    monkeypatch.setenv("MIRSEG_CPU_BF16", "1")
    forced = FakeTimer(slow_bf16.seconds)
    picked = choose("deeplabv3plus_r18", "infer", CPU, (512, 1024), "auto", dtype, forced)
    assert picked.dtype == BF16 and {n for n, _ in forced.calls} == {"channels_last bf16", "contiguous bf16"}


def test_amp_on_a_cpu_without_native_bf16_is_fp32_with_one_line_saying_why(monkeypatch, caplog):
    monkeypatch.setattr(machine, "native_bf16", lambda: False)
    net = build_model("fastscnn", 3)
    with caplog.at_level(logging.INFO, logger="mirseg"):
        steps = layout.for_training(net, "fastscnn", CPU, (64, 64), "auto", True)
    assert steps.dtype is None
    why = [r for r in caplog.records if r.getMessage().startswith("amp:")]
    assert len(why) == 1 and why[0].levelno == logging.INFO
    assert why[0].getMessage() == (f"amp: {machine.cpu_model()} has no native bfloat16 (AVX512-BF16, AMX or Arm "
                                   "BF16); training in fp32 (MIRSEG_CPU_BF16=1 forces bf16)")
    assert precision.autocast_dtype(CPU, False) is None  # amp off: nothing to say
    monkeypatch.setenv("MIRSEG_CPU_BF16", "maybe")
    with pytest.raises(ConfigError, match="MIRSEG_CPU_BF16='maybe' is not a switch: set it to 1"):
        precision.autocast_dtype(CPU, True)


# ---------------------------------------------------------------------------------------------
# Real passes


def test_a_real_probe_on_a_tiny_network_and_its_effect_on_rng_and_weights():
    model = prepare_for_inference(build_model("fastscnn", 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    picked = choose("fastscnn", "infer", CPU, (64, 128), "auto", None, layout.forward_timer(model), min_pixels=0,
                    budget_s=0.2)
    assert picked.layout in ("channels_last", "contiguous") and picked.how.startswith("probe at 64x128: ")
    entry, = _entries().values()
    assert set(entry["probe"]) == {"channels_last fp32", "contiguous fp32"} and min(entry["probe"].values()) > 0
    assert torch.equal(rng, torch.get_rng_state())  # the probe's input comes from its own generator
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    net = build_model("fastscnn", 3).train()  # a training probe runs on a copy: BN statistics stay put
    stats = net.state_dict()["backbone.learning_to_downsample.conv.bn.running_mean"].clone()
    layout.train_step_timer(net)(Choice("channels_last"), (64, 64))
    assert torch.equal(net.state_dict()["backbone.learning_to_downsample.conv.bn.running_mean"], stats)
    assert net.backbone.learning_to_downsample.conv.conv.weight.grad is None


def test_iter_predictions_puts_the_network_in_the_probed_layout(tmp_path, monkeypatch):
    net = build_model("fastscnn", 3)
    ckpt = tmp_path / "model.pth"
    atomic_save(make_checkpoint(net, "fastscnn", ["background", "a", "b"], config={"img_scale": [128, 96]}), ckpt)
    images = make_dataset(tmp_path / "images", 3, seed=3).images
    paths = sorted(str(p) for p in images.iterdir())
    fixed = load_predictor(ckpt, device="cpu")
    expected = [p.proba for p in iter_predictions(fixed, paths, workers_per_gpu=0, layout="channels_last")]
    monkeypatch.setattr(layout, "PROBE_MIN_PIXELS", 0)
    monkeypatch.setattr(layout, "PROBE_BUDGET_S", {"infer": 0.1, "train": 0.1})
    probed = load_predictor(ckpt, device="cpu")
    got = [p.proba for p in iter_predictions(probed, paths, workers_per_gpu=0)]
    entry, = _entries().values()
    assert probed.memory_format == layout.MEMORY_FORMATS[entry["layout"]]
    assert probed.model.backbone.learning_to_downsample.conv.conv.weight.is_contiguous(
        memory_format=probed.memory_format)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    keyed = load_predictor(ckpt, device="cpu")
    next(iter_predictions(keyed, paths[:1], workers_per_gpu=0, layout="contiguous"))
    assert keyed.memory_format == torch.contiguous_format


# ---------------------------------------------------------------------------------------------
# bf16 training


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return toy.shapes(tmp_path_factory.mktemp("shapes"))


def test_bf16_training_on_cpu_learns_with_fp32_losses_and_weights(shapes, tmp_path, monkeypatch):
    monkeypatch.setenv("MIRSEG_CPU_BF16", "1")  # bf16 on this CPU, native or not
    seen: dict[str, set] = {"conv": set(), "out": set(), "loss": set()}
    losses: list[float] = []

    def hook(module: nn.Module, args, output):
        if isinstance(module, nn.Conv2d) and module.training:
            seen["conv"].add(output.dtype)

    real_loss = mirseg.train.segmentation_loss

    def loss(out, labels, *args):
        seen["out"] |= {out["out"].dtype, *(a.dtype for a in out["aux"])}
        total, parts = real_loss(out, labels, *args)
        seen["loss"].add(total.dtype)
        losses.append(float(total.detach()))
        return total, parts

    monkeypatch.setattr(mirseg.train, "segmentation_loss", loss)
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        result = train(toy.shapes_config(*shapes, tmp_path / "run", max_iters=16, interval=16, samples_per_gpu=4))
    finally:
        handle.remove()
    assert seen == {"conv": {BF16}, "out": {torch.float32}, "loss": {torch.float32}}
    assert sum(losses[-4:]) < 0.85 * sum(losses[:4]), losses
    last = read_checkpoint(result.last)
    assert last["layout"] == {"layout": "contiguous", "dtype": "bf16"}
    assert {v.dtype for v in last["model"].values() if v.is_floating_point()} == {torch.float32}


@pytest.mark.slow  # three short emulated-bf16 trainings, ~6 s on a CPU without native bf16 (CI runs it)
def test_bf16_training_resumes_to_the_same_weights(shapes, tmp_path, monkeypatch):
    monkeypatch.setenv("MIRSEG_CPU_BF16", "1")

    def cfg(work_dir, **kw):
        return toy.shapes_config(*shapes, work_dir, max_iters=4, interval=2, samples_per_gpu=2, **kw)

    full = train(cfg(tmp_path / "full"))

    class Stop(Exception):
        pass

    def stop_at_3(fraction):
        if fraction >= 3 / 4:
            raise Stop

    with pytest.raises(Stop):
        train(cfg(tmp_path / "cut"), progress=stop_at_3)
    resumed = train(cfg(tmp_path / "cut", resume=True))
    a, b = read_checkpoint(full.last)["model"], read_checkpoint(resumed.last)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
