"""mmsegmentation 0.27's own networks, timed as the reference of ``bench/vs_mmseg.py``; run by it, in the
reference's own virtual environment (``bench/mmseg_env.sh`` makes one), never in mirseg's.

    <reference venv>/bin/python bench/mmseg_reference.py --config configs/fastscnn/fast_scnn_...py \
        --size 512x1024 --train-size 512x512 --repeat 5 [--bf16] [--weights out.pt]

Prints one JSON line: ``infer`` {"<layout>[+fused]/<dtype>": seconds per 1x3xH x W image} and ``train``
{"<layout>/<dtype>": seconds per step}, medians of ``--repeat`` runs after one warm-up, with this process's
torch threads. Inference is ``EncoderDecoder.encode_decode`` (the logits resized to the input, what
``mmseg``'s single-scale test runs before its softmax) in eval mode, in NCHW and channels-last, as built and
with mmcv's ``fuse_conv_bn``: ``vs_mmseg.py`` compares mirseg against the fastest of them. A training step is
``forward_train`` (decode and auxiliary heads' losses), ``_parse_losses``, backward and SGD (lr 0.01, momentum
0.9, weight decay 5e-4) on one fixed batch of 2, the top eighth of its labels ignored: what
``bench/machine.train_step`` does for mirseg. ``--weights``: save the network's weights (random, BatchNorm
statistics of two random batches), one input and its logits, so that the driver can check mirseg's network
computes the same function before it compares speeds.

The environment holds mmcv 1.6 without its compiled ops (``mmcv`` rather than ``mmcv-full``) and no
torchvision: :func:`stand_ins` registers empty modules for the two imports mmseg makes at start-up and never
calls for these networks (``mmcv.ops``' focal loss and point sampling, mmcv's torchvision model zoo).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch


def stand_ins() -> None:
    """Empty ``mmcv.ops``, ``torchvision`` and ``torchvision.models``: any attribute is a class that fails when
    used, so an import of a name succeeds and only its use would fail (none of the timed networks uses one)."""

    def module(name: str) -> types.ModuleType:
        mod = types.ModuleType(name)

        def attribute(attr: str) -> type:
            if attr.startswith("__"):
                raise AttributeError(attr)

            def unavailable(*_args: object, **_kwargs: object) -> None:
                raise RuntimeError(f"{name}.{attr} is not in this reference environment")

            return type(attr, (), {"__init__": unavailable})

        mod.__getattr__ = attribute  # type: ignore[method-assign]  # PEP 562: names resolved on first use
        mod.__path__ = []  # a package, so that "from mmcv.ops.x import y" resolves too
        return mod

    for name in ("mmcv.ops", "torchvision", "torchvision.models"):
        sys.modules.setdefault(name, module(name))


def plain_bn(node: object) -> object:
    """The config with every SyncBN made BN: one process, no process group."""
    if isinstance(node, dict):
        return {k: ("BN" if k == "type" and v == "SyncBN" else plain_bn(v)) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return type(node)(plain_bn(v) for v in node)
    return node


def build(config: str) -> torch.nn.Module:
    """The segmentor of ``config`` (a path under mmseg's packaged ``configs/``), plain BN, random weights."""
    import mmseg
    from mmcv import Config, ConfigDict
    from mmseg.models import build_segmentor

    path = Path(mmseg.__file__).parent / ".mim" / config
    cfg = Config.fromfile(str(path))
    model_cfg = plain_bn(cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model))
    model_cfg["pretrained"] = None
    model_cfg.get("backbone", {}).pop("init_cfg", None)
    model = build_segmentor(ConfigDict(model_cfg), train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
    model.init_weights()
    return model


def median_seconds(fn, repeat: int) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernels on the first call
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm statistics of two random batches (fresh ones make HRNet's logits explode), then eval."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model.encode_decode(torch.randn(2, 3, 128, 256), None)
    return model.eval()


def infer_times(model: torch.nn.Module, size: tuple[int, int], dtypes: list, repeat: int) -> dict[str, float]:
    from mmcv.cnn import fuse_conv_bn

    x = torch.randn(1, 3, *size)
    times = {}
    for fused in (False, True):
        net = fuse_conv_bn(copy.deepcopy(model)) if fused else model
        for layout, fmt in (("NCHW", torch.contiguous_format), ("CL", torch.channels_last)):
            net = net.to(memory_format=fmt)
            xf = x.contiguous(memory_format=fmt)
            for dtype in dtypes:
                def run(net=net, xf=xf, dtype=dtype) -> None:
                    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.bfloat16,
                                                                enabled=dtype is not None):
                        net.encode_decode(xf, None).float()
                times[f"{layout}{'+fused' if fused else ''}/{dtype_name(dtype)}"] = median_seconds(run, repeat)
    return times


def train_times(config: str, size: tuple[int, int], dtypes: list, repeat: int) -> dict[str, float]:
    h, w = size
    times = {}
    for layout, fmt in (("NCHW", torch.contiguous_format), ("CL", torch.channels_last)):
        for dtype in dtypes:
            torch.manual_seed(0)
            model = build(config).train().to(memory_format=fmt)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            x = torch.randn(2, 3, h, w).contiguous(memory_format=fmt)
            labels = torch.randint(0, 19, (2, 1, h, w))
            labels[:, :, : h // 8] = 255  # mmseg's ignore_index
            metas = [{"img_shape": (h, w, 3), "ori_shape": (h, w, 3), "pad_shape": (h, w, 3), "flip": False}] * 2

            def step(model=model, optimizer=optimizer, x=x, labels=labels, metas=metas, dtype=dtype) -> None:
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    losses = model.forward_train(x, metas, labels)
                loss, _ = model._parse_losses(losses)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            times[f"{layout}/{dtype_name(dtype)}"] = median_seconds(step, max(repeat // 2, 2))
    return times


def dtype_name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else "bf16"


def pair(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="mmseg config path, e.g. configs/hrnet/fcn_hr18s_512x1024_80k_cityscapes.py")
    parser.add_argument("--check", action="store_true", help="import mmseg and its models, print the versions, exit")
    parser.add_argument("--size", type=pair, default=(512, 1024))
    parser.add_argument("--train-size", type=pair, default=(512, 512))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--weights", type=Path, help="save weights, one input and its logits here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stand_ins()
    import mmcv
    import mmseg
    from mmseg.models import build_segmentor  # noqa: F401  (the import --check proves)

    if args.check:
        print(f"mmseg {mmseg.__version__}, mmcv {mmcv.__version__}, torch {torch.__version__}")
        return
    if args.config is None:
        parser.error("--config is required")

    dtypes = [None, torch.bfloat16] if args.bf16 else [None]
    torch.manual_seed(0)
    model = calibrate(build(args.config))
    if args.weights is not None:
        x = torch.randn(1, 3, 64, 128)
        with torch.inference_mode():
            logits = model.encode_decode(x, None)
        torch.save({"state_dict": model.state_dict(), "input": x, "logits": logits}, args.weights)
    result = {"mmseg": mmseg.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "infer": infer_times(model, args.size, dtypes, args.repeat),
              "train": {} if args.no_train else train_times(args.config, args.train_size, dtypes, args.repeat)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
