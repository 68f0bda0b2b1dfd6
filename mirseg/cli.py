"""The ``mirseg`` command: a thin dispatcher, each subcommand builds a config and calls one function."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mirseg import __version__
from mirseg.errors import Interrupted


def _cmd_models(args: argparse.Namespace) -> int:
    from mirseg.config import MMSEG_CONFIGS, PRESETS
    from mirseg.models import build_model

    print(f"{'preset':26} {'model':20} {'params (M)':>10}  crop      test")
    for name, p in PRESETS.items():
        n = sum(t.numel() for t in build_model(p.model, 19).parameters()) / 1e6
        print(f"{name:26} {p.model:20} {n:10.2f}  {p.crop_size[0]}x{p.crop_size[1]:<5} {p.test_mode}")
    if args.configs:
        print("\nmmseg config paths accepted as config_file:")
        for path, (preset, _) in MMSEG_CONFIGS.items():
            print(f"  {path}  ->  {preset}")
    return 0


def _config_epilog(cls: type) -> str:
    """Every config key with its default and its comment, for ``--help``."""
    import dataclasses

    from mirseg.config import field_help

    helps = field_help(cls)
    lines = ["configuration keys (key=value on the command line, or in the YAML file):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        lines.append(f"  {f.name} (default: {default!r})\n      {helps.get(f.name, '')}")
    return "\n".join(lines)


def _train_config(args: argparse.Namespace):
    from mirseg.config import TrainConfig, load_config, parse_overrides

    overrides = parse_overrides(args.overrides)
    if args.resume:
        overrides["resume"] = True
    if args.weights:
        overrides["weights"] = args.weights
    return load_config(TrainConfig, args.config, overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from mirseg.train import train

    result = train(_train_config(args))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line
        print(f"best: {result.best}  last: {result.last}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mirseg.checkpoint import read_checkpoint
    from mirseg.config import TrainConfig, load_config
    from mirseg.train import evaluate_checkpoint

    # The checkpoint's own config (test scale, mode, background mode) is the default.
    saved = read_checkpoint(args.checkpoint).get("config") or {}
    cfg = load_config(TrainConfig, args.config, args.overrides, base=saved)
    metrics = evaluate_checkpoint(args.checkpoint, cfg)
    print(f"mIoU {metrics['mIoU']:.4f}  mAcc {metrics['mAcc']:.4f}  aAcc {metrics['aAcc']:.4f}")
    return 0


def _job_config(cls: type, args: argparse.Namespace):
    """An InferConfig/MineConfig from ``--config`` YAML, then the positionals, then ``key=value``."""
    from mirseg.config import load_config, parse_overrides

    overrides = {"checkpoint": args.checkpoint, "images": args.images, **parse_overrides(args.overrides)}
    return load_config(cls, args.config, overrides)


def _cmd_infer(args: argparse.Namespace) -> int:
    from mirseg.config import InferConfig
    from mirseg.infer import run_inference

    result = run_inference(_job_config(InferConfig, args))
    failed = f" ({len(result.failed)} failed)" if result.failed else ""
    print(f"{result.num_images} images -> {result.out_dir}{failed}")
    return 1 if result.failed and result.num_images == len(result.failed) else 0


def _cmd_mine(args: argparse.Namespace) -> int:
    from mirseg.config import MineConfig
    from mirseg.mine import mine

    result = mine(_job_config(MineConfig, args))
    print(f"ranked {len(result.ranking)} images -> {result.tsv}" + (f" ({len(result.failed)} unreadable, ranked last)"
                                                                  if result.failed else ""))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from mirseg.export import export

    path = export(args.checkpoint, args.format, args.output, height=args.height, width=args.width,
                  opset=args.opset, check=not args.no_check)
    print(f"exported {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mirseg.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed)
    return 0


def _cmd_ymir(args: argparse.Namespace) -> int:
    from mirseg.ymir.executor import main as ymir_main

    return ymir_main(["--env", args.env] if args.env else [])


def _add_job_parser(sub: argparse._SubParsersAction, name: str, cls: type, func, help_: str, example: str) -> None:
    p = sub.add_parser(name, help=help_, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_config_epilog(cls), description=f"{help_[0].upper()}{help_[1:]}. Example:\n  {example}")
    p.add_argument("checkpoint", help="a mirseg checkpoint (best.pth, last.pth)")
    p.add_argument("images", help="image folder, glob pattern in quotes, or a text file listing image paths")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="configuration keys (see below)")
    p.add_argument("--config", help="YAML file of configuration keys; key=value arguments override it")
    p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirseg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mirseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the architectures and presets")
    p.add_argument("--configs", action="store_true", help="also list the mmseg config paths accepted")
    p.set_defaults(func=_cmd_models)

    from mirseg.config import TrainConfig

    p = sub.add_parser(
        "train", help="train a network on COCO or label-PNG data",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_config_epilog(TrainConfig),
        description="Train a network. Example:\n  mirseg train config_file=fastscnn train_ann=train.json "
                    "train_images=images/ val_ann=val.json val_images=images/ max_iters=2000",
    )
    p.add_argument("config", nargs="?", help="YAML file of configuration keys (optional)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="configuration keys, override the file")
    p.add_argument("--resume", action="store_true", help="continue work_dir/last.pth with the same schedule")
    p.add_argument("--weights", help="initial weights: mirseg or mmseg checkpoint, or a state dict")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "eval", help="evaluate a checkpoint on a labelled dataset",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_config_epilog(TrainConfig),
        description="Evaluate a mirseg checkpoint; the checkpoint's config is the default. Example:\n"
                    "  mirseg eval runs/train/best.pth val_ann=val.json val_images=images/",
    )
    p.add_argument("checkpoint", help="a mirseg checkpoint (best.pth, last.pth)")
    p.add_argument("config", nargs="?", help="YAML file of configuration keys (optional)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="configuration keys (val_ann=..., ...)")
    p.set_defaults(func=_cmd_eval)

    from mirseg.config import InferConfig, MineConfig

    _add_job_parser(sub, "infer", InferConfig, _cmd_infer, "predict label maps, overlays and COCO RLE for images",
                    "mirseg infer runs/train/best.pth photos/ out_dir=runs/infer save_overlay=true")
    _add_job_parser(sub, "mine", MineConfig, _cmd_mine, "rank unlabelled images by how much labelling them helps",
                    "mirseg mine runs/train/best.pth pool/ mining_algorithm=rsal out_dir=runs/mine")

    p = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript",
                       description="Export a checkpoint. Example:\n  mirseg export runs/train/best.pth --format onnx",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a mirseg checkpoint")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="output format (default onnx)")
    p.add_argument("--output", help="output file (default: the checkpoint's path with .onnx / .torchscript.pt)")
    p.add_argument("--height", type=int, default=512, help="height of the example input used for tracing")
    p.add_argument("--width", type=int, default=1024, help="width of the example input used for tracing")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.add_argument("--no-check", action="store_true", help="skip comparing the export with PyTorch on a random input")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", help="train, infer and mine on generated street scenes (CPU, minutes)",
                       description="The whole job on generated data: training, inference with overlays, mining "
                                   "(RSAL vs random) and one YMIR executor run, into one folder with SUMMARY.md.")
    p.add_argument("--out", default="mirseg-demo", help="output folder (default mirseg-demo; an earlier demo "
                                                        "there is replaced)")
    p.add_argument("--quick", action="store_true", help="tiny version, under a minute (the tests use it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data and the training")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("ymir", help="run as the YMIR platform's executor (reads /in/env.yaml, writes /out)")
    p.add_argument("--env", help="env.yaml (default: $MIRSEG_YMIR_ENV or /in/env.yaml)")
    p.set_defaults(func=_cmd_ymir)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # A first positional with "=" is an override, not a YAML file.
    if args.command in ("train", "eval") and args.config and "=" in args.config:
        args.overrides = [args.config, *args.overrides]
        args.config = None
    try:
        return args.func(args)
    except Interrupted as exc:  # SIGINT/SIGTERM after saving: one line, exit 130/143
        logging.getLogger("mirseg").error("%s", exc)
        return exc.exit_code
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        logging.getLogger("mirseg").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
