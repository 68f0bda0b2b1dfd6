"""The ``mirseg`` command: a thin dispatcher, each subcommand builds a config and calls one function."""

from __future__ import annotations

import argparse
import logging
import sys

from mirseg import __version__


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirseg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mirseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the architectures and presets")
    p.add_argument("--configs", action="store_true", help="also list the mmseg config paths accepted")
    p.set_defaults(func=_cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        logging.getLogger("mirseg").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
