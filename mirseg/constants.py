"""Numbers that every part of mirseg must agree on, defined once."""

IGNORE_INDEX = 255
"""Label value excluded from loss and metrics (also the label padding value)."""

BACKGROUND = "background"
"""Name of the class formed by unannotated pixels when ``ignore_blank_area`` is false."""

# ImageNet statistics in RGB order, 0-255 scale (the mmseg configs' img_norm_cfg).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
