"""One torchrun worker of a multi-GPU YMIR training: ``python -m mirseg.ymir.worker train.yaml``.

The executor validated the config and wrote it to ``train.yaml``; rank 0 reports progress to the
monitor file the executor passes in ``MIRSEG_YMIR_MONITOR``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from mirseg.config import TrainConfig, load_config
from mirseg.train import train
from mirseg.ymir.protocol import TASK, Monitor


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    cfg = load_config(TrainConfig, argv[0])
    progress = None
    if os.environ.get("RANK", "0") == "0" and os.environ.get("MIRSEG_YMIR_MONITOR"):
        monitor = Monitor(Path(os.environ["MIRSEG_YMIR_MONITOR"]), os.environ.get("MIRSEG_YMIR_TASK_ID", "mirseg"))
        progress = lambda p: monitor.update(TASK, p)  # noqa: E731
    train(cfg, progress=progress)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
