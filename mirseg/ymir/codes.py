"""The monitor error code of a failure, the same whether the task ran in one process or in several."""

from __future__ import annotations

import torch

from mirseg.data import DatasetError, ImageError
from mirseg.train import TrainingDiverged
from mirseg.ymir.protocol import CODE_DATASET, CODE_IMAGE, CODE_NAN, CODE_OOM, YmirError


def error_code(exc: BaseException, default: int) -> int:
    """The monitor error code for an exception (``default`` for one without its own)."""
    if isinstance(exc, YmirError):
        return exc.code
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return CODE_OOM
    if isinstance(exc, TrainingDiverged):
        return CODE_NAN
    if isinstance(exc, ImageError):
        return CODE_IMAGE
    if isinstance(exc, (DatasetError, FileNotFoundError)):
        return CODE_DATASET
    return default
