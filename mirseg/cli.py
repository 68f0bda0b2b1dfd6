"""The ``mirseg`` command: a thin dispatcher, each subcommand builds a config and calls one function.

Errors: a :class:`mirseg.errors.MirsegError` (bad key, missing file, malformed data) is logged as its
message alone and the command exits with ``EXIT_ERROR`` (2); ``Interrupted`` exits 130/143; CUDA
running out of memory is one line naming the keys to lower (exit 2). Any other exception is a bug
and keeps its traceback (exit 1).

``train``, ``infer`` and ``mine`` take ``--gpus N``: the command checks its config, then runs itself again in
N processes of its own torchrun group (:mod:`mirseg.launch`) and exits as the group's first failure did.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import re
import sys

from mirseg import __version__, launch
from mirseg.coerce import field_help, parse_overrides
from mirseg.config import InferConfig, MineConfig, TrainConfig, eval_config, load_config
from mirseg.errors import EXIT_ERROR, EXIT_FAILED, ConfigError, Interrupted, MirsegError
from mirseg.presets import MMSEG_CONFIGS, PRESETS

# Each command imports its module (and with it torch, ~3 s) inside its function, so that `mirseg --help`,
# a usage error or a config error answers at once: these are the only imports inside functions here.

log = logging.getLogger("mirseg")

# What to lower when CUDA runs out of memory, per command (the keys of its config class).
OOM_HINTS = {
    "train": "lower samples_per_gpu or crop_size (e.g. samples_per_gpu=1 crop_size=[512,512]) and keep amp=true",
    "eval": "lower img_scale, or evaluate with test_mode=slide and a smaller slide_crop",
    "infer": "lower samples_per_gpu or img_scale, or use test_mode=slide with a smaller slide_crop, or amp=true",
    "mine": "lower samples_per_gpu or img_scale, and keep fp16=true",
}


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: flags may come anywhere among the ``key=value`` arguments, and a wrong flag
    is reported with this subcommand's usage and a "did you mean"."""

    _parsing = False

    def parse_known_args(self, args: list[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        # Python < 3.13 implements parse_known_intermixed_args by calling parse_known_args: plain parsing then.
        # A parser with subcommands of its own (`mirseg weights list|download`) cannot parse intermixed;
        # its subcommands' parsers do.
        if self._parsing or any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            namespace, extras = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False
        if extras:
            flags = [s for action in self._actions for s in action.option_strings]
            hints = [f"did you mean {m[0]}?" for m in (difflib.get_close_matches(e.split("=")[0], flags, n=1)
                                                       for e in extras if e.startswith("-")) if m]
            self.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else ""))
        return namespace, extras


def _cmd_models(args: argparse.Namespace) -> int:
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
    helps = field_help(cls)
    lines = ["configuration keys (key=value on the command line, or in the YAML file):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        lines.append(f"  {f.name} (default: {default!r})\n      {helps.get(f.name, '')}")
    return "\n".join(lines)


def _yaml_file(path: str | None) -> str | None:
    """The optional YAML positional of train/eval; a bare word is more likely a key without its value."""
    if path and not os.path.exists(path) and path.isidentifier():
        raise ConfigError(f"{path!r} is neither a YAML file nor key=value: give {path}=VALUE, or the path of a "
                          "YAML file")
    return path


def _train_config(args: argparse.Namespace):
    overrides = parse_overrides(args.overrides)
    if args.resume:
        overrides["resume"] = True
    if args.weights:
        overrides["weights"] = args.weights
    cfg = load_config(TrainConfig, _yaml_file(args.config), overrides)
    return cfg


def _cmd_train(args: argparse.Namespace) -> int:
    from mirseg.train import train

    result = train(_train_config(args))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line
        print(f"best: {result.best}  last: {result.last}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mirseg.checkpoint import read_checkpoint
    from mirseg.evaluate import evaluate_checkpoint

    # The checkpoint's own config (test scale, mode, background mode) is the default; whether to trust
    # the file is this run's choice (the keys given here), never inherited from the file itself.
    trust = eval_config({}, _yaml_file(args.config), args.overrides).trust_checkpoint
    saved = dict(read_checkpoint(args.checkpoint, trust).get("config") or {})
    saved.pop("trust_checkpoint", None)
    cfg = eval_config(saved, _yaml_file(args.config), args.overrides)
    metrics = evaluate_checkpoint(args.checkpoint, cfg)
    print(f"mIoU {metrics['mIoU']:.4f}  mAcc {metrics['mAcc']:.4f}  aAcc {metrics['aAcc']:.4f}")
    return 0


def _job_config(cls: type, args: argparse.Namespace):
    """An InferConfig/MineConfig from ``--config`` YAML, then the positionals, then ``key=value``."""
    overrides = {"checkpoint": args.checkpoint, "images": args.images, **parse_overrides(args.overrides)}
    cfg = load_config(cls, args.config, overrides)
    return cfg


def _cmd_infer(args: argparse.Namespace) -> int:
    from mirseg.infer import run_inference

    result = run_inference(_job_config(InferConfig, args))
    failed = f" ({len(result.failed)} failed)" if result.failed else ""
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line
        print(f"{result.num_images} images -> {result.out_dir}{failed}")
    return 1 if result.failed and result.num_images == len(result.failed) else 0


def _cmd_mine(args: argparse.Namespace) -> int:
    from mirseg.mine import mine

    result = mine(_job_config(MineConfig, args))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line
        print(f"ranked {len(result.ranking)} images -> {result.tsv}"
              + (f" ({len(result.failed)} unreadable, ranked last)" if result.failed else ""))
    return 0


JOB_CONFIGS = {"infer": InferConfig, "mine": MineConfig}


def _gpus_flag(word: str) -> bool:
    """``--gpus`` as argparse reads it: the flag, ``--gpus=N``, or an abbreviation (``--gpu``)."""
    name = word.partition("=")[0]
    return len(name) >= 3 and "--gpus".startswith(name)


def _without_gpus(argv: list[str]) -> list[str]:
    """``argv`` without its ``--gpus N`` (the command the group's processes run)."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif _gpus_flag(word):
            skip = "=" not in word
        else:
            out.append(word)
    return out


def _launch_group(args: argparse.Namespace, argv: list[str]) -> int:
    """``--gpus N``: check the config and the GPUs here (one message, not N), then run the command without
    ``--gpus`` in N torchrun processes; their first real failure's exit code is the command's."""
    from mirseg import dist

    if launch.REPORTS_ENV in os.environ or "WORLD_SIZE" in os.environ:
        raise ConfigError("--gpus starts a torchrun group of its own: under torchrun leave it out (torchrun's "
                          "--nproc_per_node sets the processes)")
    if args.command == "train":
        _train_config(args)
    else:
        _job_config(JOB_CONFIGS[args.command], args)
    dist.check_processes(args.gpus)
    dist.timeout()  # a bad MIRSEG_DIST_TIMEOUT fails here, once
    cmd = launch.torchrun_command(args.gpus, "mirseg", _without_gpus(argv))
    log.info("mirseg %s on %d processes: %s", args.command, args.gpus, " ".join(cmd))
    group = launch.run_group(cmd, args.gpus)
    if group.exit_code:
        log.error("mirseg %s --gpus %d: %s", args.command, args.gpus, group.describe())
    return group.exit_code


def _cmd_export(args: argparse.Namespace) -> int:
    from mirseg.export import export

    path = export(args.checkpoint, args.format, args.output, height=args.height, width=args.width,
                  opset=args.opset, check=not args.no_check, trust_checkpoint=args.trust_checkpoint)
    print(f"exported {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mirseg.demo import run_demo

    return run_demo(args.out, quick=args.quick, seed=args.seed).exit_code  # non-zero when a step failed


def _cmd_weights(args: argparse.Namespace) -> int:
    from mirseg import pretrained

    folder = pretrained.weights_dir(args.dir or "")
    if args.action == "list":
        print(pretrained.listing(folder))
        return 0
    fetched, failed = pretrained.download(args.names, args.all, folder, args.url_base or "")
    for got in fetched:
        print(f"{got.path}: {'downloaded' if got.downloaded else 'already there, verified'} (sha256 {got.sha256})")
    if failed:
        print(f"{len(failed)} of {len(fetched) + len(failed)} files could not be fetched: {', '.join(failed)} "
              "(see the errors above)", file=sys.stderr)
    return 1 if failed else 0


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
    _add_gpus(p)
    p.set_defaults(func=func)


def _add_gpus(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, metavar="N",
                   help="run in N processes, one per GPU, started with torchrun (without CUDA: N CPU processes, "
                        "gloo); for several machines run torchrun yourself (README)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirseg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mirseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    p = sub.add_parser("models", help="list the architectures and presets")
    p.add_argument("--configs", action="store_true", help="also list the mmseg config paths accepted")
    p.set_defaults(func=_cmd_models)

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
    _add_gpus(p)
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
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load the checkpoint with full unpickling (runs any code in it: only for files you trust)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("weights", help="list or download the pretrained starts (model-zoo and ImageNet files)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="The files pretrained=auto looks for. Examples:\n  mirseg weights list\n"
                                   "  mirseg weights download hrnet_w18s resnet18_v1c-b5776b93.pth\n"
                                   "  mirseg weights download --all --url-base http://mirror.local/weights")
    wsub = p.add_subparsers(dest="action", required=True)
    w = wsub.add_parser("list", help="every known file, for which presets, its size if present, where it goes")
    w.add_argument("--dir", help="weights folder (default: $MIRSEG_WEIGHTS, else ~/.cache/mirseg/weights)")
    w = wsub.add_parser("download", help="fetch files, verify the sha256 in their names, keep them in the folder")
    w.add_argument("names", nargs="*", metavar="NAME",
                   help="a file name (see list), a preset (its model-zoo file), zoo / imagenet / all (every such file)")
    w.add_argument("--all", action="store_true", help="every known file")
    w.add_argument("--dir", help="weights folder (default: $MIRSEG_WEIGHTS, else ~/.cache/mirseg/weights)")
    w.add_argument("--url-base", help="fetch <URL>/<file name> instead of the publishers' URLs (a mirror, a local "
                                      "server)")
    p.set_defaults(func=_cmd_weights)

    p = sub.add_parser("demo", help="train, infer and mine on generated street scenes (CPU, minutes)",
                       description="The whole job on generated data: training, inference with overlays, mining "
                                   "(RSAL vs random) and one YMIR executor run, into one folder with SUMMARY.md.")
    p.add_argument("--out", default="mirseg-demo", help="output folder (default mirseg-demo; an earlier or "
                                                        "interrupted demo there is replaced)")
    p.add_argument("--quick", action="store_true", help="tiny version, under a minute (the tests use it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data and the training")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("ymir", help="run as the YMIR platform's executor (reads /in/env.yaml, writes /out)")
    p.add_argument("--env", help="env.yaml (default: $MIRSEG_YMIR_ENV or /in/env.yaml)")
    p.set_defaults(func=_cmd_ymir)
    return parser


def _is_override(text: str) -> bool:
    """``key=value`` rather than a YAML path (which may hold "=" in a folder name)."""
    key, sep, _ = text.partition("=")
    return bool(sep) and key.strip().isidentifier()


def _cuda_oom(exc: BaseException) -> bool:
    # The command imported torch if it ran anything on a GPU; not importing it here keeps `mirseg --help` fast.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)


def _oom_message(command: str, exc: BaseException) -> str:
    tried = re.search(r"Tried to allocate [\d.]+ \w+", str(exc))
    hint = OOM_HINTS.get(command, "lower the batch size or the image size")
    return (f"CUDA ran out of memory in mirseg {command}" + (f" ({tried.group(0).lower()})" if tried else "")
            + f": {hint}; or run on the CPU with device=cpu")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # A first positional that is key=value is an override, not a YAML file.
    if args.command in ("train", "eval") and args.config and _is_override(args.config):
        args.overrides = [args.config, *args.overrides]
        args.config = None
    launch.announce()  # in a process of a `--gpus` group: its launcher watches it (elsewhere nothing)
    try:
        if getattr(args, "gpus", None) is not None and args.gpus != 1:
            return _launch_group(args, argv)
        code = args.func(args)
    except Interrupted as exc:  # stopped by SIGINT/SIGTERM after saving what it had
        log.error("%s", exc)
        launch.report("interrupted", exc.exit_code, str(exc))
        return exc.exit_code
    except MirsegError as exc:  # the user's to fix: the message says what and how, a traceback would bury it
        log.error("%s", exc)
        launch.report("error", EXIT_ERROR, str(exc))
        return EXIT_ERROR
    except Exception as exc:
        if _cuda_oom(exc):
            log.error("%s", _oom_message(args.command, exc))
            launch.report("error", EXIT_ERROR, _oom_message(args.command, exc))
            return EXIT_ERROR
        launch.report(launch.failure_kind(exc), EXIT_FAILED, f"{type(exc).__name__}: {exc}")
        raise  # a bug or an environment failure: the traceback is what a report needs
    launch.report("ok" if code == 0 else "error", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
