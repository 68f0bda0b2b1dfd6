"""mirseg: semantic segmentation that trains, infers and mines, in plain PyTorch."""

__version__ = "0.1.0"
