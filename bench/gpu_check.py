"""The GPU check kit: one command, one table of speed, memory and exactness on this machine's first GPU.

    python bench/gpu_check.py [--quick | --tiny] [--nets all | fastscnn,hrnet_w18s] [--out DIR] [--budget 360]

Sections (the table's first column):

* **a** inference fps of each network on one 1x3x1024x2048 image, whole mode, prepared as ``mirseg infer``
  prepares it (``prepare_for_inference``: BatchNorm folded, channels-last) and run through ``predict_batch``
  and ``label_map`` (softmax, argmax), fp32 and fp16 autocast; ``original`` is the V100 fps of the original
  image's README (the mmseg model zoo, fp32), ``ratio`` measured / original.
* **b** training s/iter and peak ``torch.cuda.max_memory_allocated`` with 2 images of 512x1024 per GPU (4 for
  FastSCNN, as its 8x4 config the Mem column measured), amp (fp16 autocast, GradScaler, fused SGD, as
  ``mirseg train`` on CUDA) and SyncBatchNorm; ``original`` is the README's Mem column (GB, fp32 training).
* **c** fp16 against fp32 with a FastSCNN trained here on generated shapes: the share of equal labels over a
  generated pool (``mirseg infer``'s path, >= 99.5 % expected) and the top-k overlap of the RSAL and entropy
  rankings (``mirseg mine``).
* **d** 20 training iterations stopped by SIGTERM at 10 and resumed, against an uninterrupted run: the max
  difference of the two loss curves (TensorBoard ``loss/total``); 0 on CPU, within a tolerance on CUDA.
* **e** a YMIR training, mining and inference task on generated data with ``gpu_count: 1``, each run as the
  platform runs it (``python -m mirseg.ymir``): pass or fail.

The correctness sections (d, c, e) run first, then a and b; each checks the time spent and writes
``skipped: time`` instead of starting what would end past ``--budget`` seconds (default 6 minutes). Without
CUDA the same table comes out with ``cpu`` in the device column at small sizes (``--quick``: 1x3x256x512
inference, 2x3x128x256 training, three networks unless ``--nets all``); ``--tiny`` is the smallest, for the
test suite. ``--out DIR`` also writes ``DIR/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # one table on stdout: no progress bars (read when tqdm is imported)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from gpu_exact import Shapes, agreement, resume_curves, ymir_tasks  # noqa: E402  (c, d, e)
from machine import cpu_signature  # noqa: E402  (bench/machine.py, beside this script)
from torch import nn  # noqa: E402

from mirseg.fileio import write_atomic  # noqa: E402
from mirseg.loss import segmentation_loss  # noqa: E402
from mirseg.models import MODELS, build_model  # noqa: E402
from mirseg.precision import autocast_dtype  # noqa: E402
from mirseg.predict import label_map, predict_batch, prepare_for_inference  # noqa: E402

# The original image's README (mmseg model zoo, Cityscapes 512x1024 configs, V100): Mem (GB) of training, fps
# of inference on 1024x2048 images.
ORIGINAL = {"fastscnn": (3.3, 56.45), "hrnet_w18s": (1.7, 23.74), "hrnet_w18": (2.9, 12.97),
            "deeplabv3plus_r18": (2.2, 14.27), "deeplabv3plus_r18b": (2.1, 14.95), "deeplabv3plus_r50": (7.5, 3.94),
            "ocrnet_hr18s": (3.5, 10.45), "ocrnet_hr18": (4.7, 7.50)}
ORIGINAL_BATCH = {"fastscnn": 4}  # images per GPU of the config the Mem column measured (8x4); the others 8x2
CPU_NETS = ["fastscnn", "hrnet_w18s", "deeplabv3plus_r18"]
LABELS_EXPECTED, TOPK_EXPECTED, CUDA_CURVE_TOL = 0.995, 0.8, 1e-2


@dataclass(frozen=True)
class Profile:
    """The sizes of one run of the kit."""

    infer: tuple[int, int]  # (H, W) of the 1x3xHxW inference image
    train: tuple[int, int]  # (H, W) of the training images (2 per batch, ORIGINAL_BATCH at full size)
    seconds: float  # each speed figure: calls for at least this long after two warm-up calls
    data: tuple[int, int]  # (H, W) of the generated shapes (c, d, e)
    crop: int  # training crop of c, d, e
    toy_iters: int  # c: the FastSCNN whose fp16 and fp32 predictions are compared
    pool: int  # c: generated candidates
    ymir_iters: int  # e: the YMIR training task
    estimate: dict[str, float]  # seconds a section (d, c, e) or one network (a, b) takes, for the time guard


PROFILES = {
    "full": Profile(infer=(1024, 2048), train=(512, 1024), seconds=2.0, data=(96, 128), crop=64, toy_iters=300,
                    pool=32, ymir_iters=60, estimate={"d": 40, "c": 60, "e": 120, "a": 15, "b": 15}),
    "quick": Profile(infer=(256, 512), train=(128, 256), seconds=1.0, data=(96, 128), crop=64, toy_iters=100,
                     pool=16, ymir_iters=20, estimate={"d": 15, "c": 40, "e": 40, "a": 10, "b": 10}),
    "tiny": Profile(infer=(64, 128), train=(64, 64), seconds=0.0, data=(48, 64), crop=32, toy_iters=6, pool=6,
                    ymir_iters=3, estimate={"d": 5, "c": 5, "e": 15, "a": 2, "b": 2}),
}


@dataclass
class Row:
    """One line of the table (all text, as printed)."""

    section: str
    check: str
    device: str
    measured: str = ""
    unit: str = ""
    original: str = ""
    ratio: str = ""
    result: str = ""


@dataclass
class Kit:
    """What the sections share: the device, the sizes, the clock, the rows so far and a scratch folder."""

    dev: torch.device
    prof: Profile
    full_size: bool  # the reference sizes: the ratio columns compare like with like
    budget: float
    work: Path
    rows: list[Row] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    shapes: Shapes | None = None  # c, d: the generated images they train on

    def add(self, section: str, check: str, *values: str) -> None:
        self.rows.append(Row(section, check, self.dev.type, *values))
        print(f"  {section} {check}: {' '.join(v for v in values if v)}", file=sys.stderr, flush=True)

    def fits(self, seconds: float) -> bool:
        """Whether ``seconds`` more work ends within the budget."""
        return time.perf_counter() - self.t0 + seconds <= self.budget

    def guarded(self, section: str, check: str, seconds: float, fn: Callable[[], None]) -> None:
        """``fn()`` if it fits in the time left, else a ``skipped: time`` row; an error becomes an ``error`` row."""
        if not self.fits(seconds):
            self.add(section, check, "", "", "", "", "skipped: time")
            return
        try:
            fn()
        except Exception as exc:  # one failing check must not lose the table
            self.add(section, check, "", "", "", "", f"error: {type(exc).__name__}: {str(exc)[:160]}")
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def per_second(fn: Callable[[], object], dev: torch.device, seconds: float) -> float:
    """Calls of ``fn`` per second (each waited for), after two warm-up calls, over at least ``seconds`` and 3 calls."""
    for _ in range(2):
        fn()
    _sync(dev)
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        fn()
        _sync(dev)
        n += 1
    return n / (time.perf_counter() - t0)


def _half(dev: torch.device) -> tuple[str, torch.dtype | None]:
    """mirseg's autocast on this device: fp16 on CUDA, bf16 on a CPU with native bf16, else none (fp32)."""
    dtype = autocast_dtype(dev, True)
    return ("fp16" if dtype == torch.float16 else "bf16" if dtype == torch.bfloat16 else "half"), dtype


def _ratio(measured: float, original: float, like_for_like: bool) -> str:
    return f"{measured / original:.2f}" if like_for_like else "-"


# ---------------------------------------------------------------------------------------------
# a, b: speed and memory of the networks


def calibrated(name: str, dev: torch.device) -> nn.Module:
    """Random weights, BatchNorm statistics from random inputs (fresh ones make HRNet's logits overflow fp16)."""
    torch.manual_seed(0)
    model = build_model(name, 19)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a plain average over the calibration batches
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 128, 256))
    return model.to(dev)


def inference_fps(kit: Kit, name: str) -> None:
    torch.backends.cudnn.benchmark = False  # as mirseg infer runs (train() in c, d turned it on)
    model = prepare_for_inference(calibrated(name, kit.dev))
    h, w = kit.prof.infer
    x = torch.randn(1, 3, h, w, device=kit.dev)
    half, half_dtype = _half(kit.dev)
    for label, dtype in (("fp32", None), (half, half_dtype)):
        if label == "half":
            kit.add("a", f"{name} half", "", "", "", "", "n/a: no native half precision (mirseg runs fp32)")
            continue

        def once(dtype: torch.dtype | None = dtype) -> None:
            proba = predict_batch(model, [x], (h, w), "whole", dtype=dtype)  # (1, C, H, W) fp32
            label_map(proba[0], (h, w))

        fps = per_second(once, kit.dev, kit.prof.seconds)
        ref = ORIGINAL[name][1]
        kit.add("a", f"{name} {label} 1x3x{h}x{w}", f"{fps:.2f}", "img/s", f"{ref:g}",
                _ratio(fps, ref, kit.full_size), "")


def training_speed(kit: Kit, name: str) -> None:
    dev, cuda = kit.dev, kit.dev.type == "cuda"
    torch.backends.cudnn.benchmark = cuda  # as mirseg train on CUDA
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(0)
    model = build_model(name, 19)
    if cuda:  # one process: the conversion is made, but SyncBatchNorm syncs only across >1 processes
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=cuda or None)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    n = ORIGINAL_BATCH.get(name, 2) if kit.full_size else 2
    h, w = kit.prof.train
    x = torch.randn(n, 3, h, w, device=dev)
    y = torch.randint(0, 19, (n, h, w), device=dev)
    y[:, : h // 8] = 255  # some unlabelled pixels, as real labels have

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.float16, enabled=scaler.is_enabled()):
            out = model(x)
        loss, _ = segmentation_loss(out, y, model.aux_weights)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    rate = per_second(step, dev, kit.prof.seconds)
    kit.add("b", f"{name} train {n}x3x{h}x{w}", f"{1 / rate:.3f}", "s/iter", "", "", "amp" if cuda else "fp32")
    ref = ORIGINAL[name][0]
    if cuda:
        peak = torch.cuda.max_memory_allocated(dev) / 2**30
        kit.add("b", f"{name} peak memory", f"{peak:.2f}", "GB", f"{ref:g}", _ratio(peak, ref, kit.full_size), "")
    else:
        kit.add("b", f"{name} peak memory", "", "GB", f"{ref:g}", "-", "n/a: CUDA only")


# ---------------------------------------------------------------------------------------------
# c, d, e: the correctness runs (bench/gpu_exact.py)


def _shapes(kit: Kit) -> Shapes:
    if kit.shapes is None:
        kit.shapes = Shapes.make(kit.work / "shapes", kit.prof.data, kit.prof.crop)
    return kit.shapes


def fp16_agreement(kit: Kit) -> None:
    half, dtype = _half(kit.dev)

    def verdict(ok: bool) -> str:  # without native half precision mirseg runs fp32 both times: nothing to judge
        return ("pass" if ok else "FAIL") if dtype is not None else "info: no native half here, both fp32"

    k = min(10, kit.prof.pool // 2)
    share, overlaps = agreement(_shapes(kit), kit.work, kit.dev, kit.prof.toy_iters, kit.prof.pool, k)
    kit.add("c", f"labels {half} = fp32 ({kit.prof.pool} images)", f"{share:.5f}", "share", f">= {LABELS_EXPECTED}",
            "", verdict(share >= LABELS_EXPECTED))
    for algorithm, overlap in overlaps.items():
        kit.add("c", f"{algorithm} top-{k} {half} vs fp32", f"{overlap:.2f}", "overlap", f">= {TOPK_EXPECTED}", "",
                verdict(overlap >= TOPK_EXPECTED))


def resume(kit: Kit) -> None:
    cuda = kit.dev.type == "cuda"
    full, cut, *again = resume_curves(_shapes(kit), kit.work, kit.dev, again=cuda)

    def max_diff(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> float:
        if [s for s, _ in a] != [s for s, _ in b] or len(a) != 20:
            raise AssertionError(f"logged steps differ: {[s for s, _ in a]} vs {[s for s, _ in b]}")
        return max(abs(x - y) for (_, x), (_, y) in zip(a, b))

    diff, tol = max_diff(full, cut), CUDA_CURVE_TOL if cuda else 0.0  # CUDA: cuDNN's choices, atomic adds vary
    kit.add("d", "resume at 10 of 20: max abs loss difference", f"{diff:.2e}", "loss", f"<= {tol:g}", "",
            "pass" if diff <= tol else "FAIL")
    if again:  # the floor: two runs through differ this much on this device
        kit.add("d", "two runs through: max abs loss difference", f"{max_diff(full, again[0]):.2e}", "loss", "",
                "", "info")


def ymir(kit: Kit) -> None:
    def left() -> float:  # a task still running then is a FAIL row, not a hung kit
        return max(kit.budget - (time.perf_counter() - kit.t0), 60)

    for task, seconds, result in ymir_tasks(kit.work / "ymir", kit.dev.type == "cuda", kit.prof.data, kit.prof.crop,
                                            kit.prof.ymir_iters, left):
        kit.add("e", f"ymir {task} task", f"{seconds:.1f}", "s", "", "", result)


# ---------------------------------------------------------------------------------------------
# the table


def table(kit: Kit, header: str) -> str:
    order = "abcde"
    rows = sorted(kit.rows, key=lambda r: order.index(r.section))  # stable: the order within a section stays
    cols = ["section", "check", "device", "measured", "unit", "original (V100)", "ratio", "result"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(v.replace("|", "/") for v in asdict(r).values()) + " |" for r in rows]
    cuda = kit.dev.type == "cuda"
    notes = ["a: ratio = measured / the V100 fps of the original image's README (mmseg model zoo, fp32)"
             if kit.full_size else "a, b: ratio '-': these are not the reference sizes (1x3x1024x2048, 2x3x512x1024)",
             "b: 2 images per GPU (fastscnn 4, as its 8x4 config); one process: convert_sync_batchnorm replaces every "
             "BatchNorm, but SyncBatchNorm syncs only across processes (no sync cost measured); the original's Mem "
             "is of fp32 training, ours of amp" if cuda else
             "b: fp32 and plain BatchNorm, as mirseg train runs on a CPU; peak memory is measured on CUDA only",
             "c: half is mirseg's autocast: fp16 on CUDA, bf16 on a CPU with native bf16 (else none: fp32)",
             f"total {time.perf_counter() - kit.t0:.0f} s of a {kit.budget:.0f} s budget"]
    return "\n".join(lines + [""] + [f"Note: {n}" for n in notes])


def _sections(kit: Kit, nets: list[str]) -> None:
    """The correctness checks first, then the speed of each network (as many as the time left allows)."""
    est = kit.prof.estimate
    kit.guarded("d", "resume at 10 of 20", est["d"], lambda: resume(kit))
    kit.guarded("c", "fp16 agreement", est["c"], lambda: fp16_agreement(kit))
    kit.guarded("e", "ymir tasks", est["e"], lambda: ymir(kit))
    for net in nets:
        kit.guarded("a", f"{net} inference", est["a"], lambda net=net: inference_fps(kit, net))
    for net in nets:
        kit.guarded("b", f"{net} training", est["b"], lambda net=net: training_speed(kit, net))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (the default without CUDA)")
    size.add_argument("--tiny", action="store_true", help="the smallest sizes (the test suite)")
    parser.add_argument("--nets", default="", help="comma-separated networks or 'all' (default: all on CUDA, "
                        f"{','.join(CPU_NETS)} on CPU)")
    parser.add_argument("--out", default="", help="also write DIR/gpu_check.json")
    parser.add_argument("--budget", type=float, default=360.0, help="seconds the whole check may take")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    name = "tiny" if args.tiny else "quick" if args.quick or dev.type != "cuda" else "full"
    nets = list(MODELS) if args.nets == "all" else [n for n in args.nets.split(",") if n] or (
        list(MODELS) if dev.type == "cuda" else CPU_NETS)
    unknown = sorted(set(nets) - set(MODELS))
    if unknown:
        parser.error(f"unknown networks {unknown}; choose from {', '.join(MODELS)} or 'all'")
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    header = (f"# mirseg GPU check: device {device_name}, torch {torch.__version__}, CPU {cpu_signature()} "
              f"({os.cpu_count()} cores), load average {load}; sizes {name}")
    print(header, file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="mirseg-gpu-check-") as tmp:
        kit = Kit(dev, PROFILES[name], name == "full", args.budget, Path(tmp))
        with contextlib.redirect_stdout(sys.stderr):  # train() prints its metrics table: stdout is for ours
            _sections(kit, nets)
        text = table(kit, header)
    print(text)
    if args.out:
        write_atomic(Path(args.out) / "gpu_check.json", json.dumps(
            {"header": header, "sizes": name, "rows": [asdict(r) for r in kit.rows], "table": text}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
