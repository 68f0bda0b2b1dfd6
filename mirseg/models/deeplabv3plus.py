"""DeepLabV3+ (Chen et al. 2018, "Encoder-Decoder with Atrous Separable Convolution for Semantic Image
Segmentation", arXiv 1802.02611) on a dilated ResNet-D8 backbone.

Mirrors mmsegmentation 0.27's configs ``deeplabv3plus_r18-d8_512x1024_80k_cityscapes.py`` (ResNetV1c-18),
``deeplabv3plus_r18b-d8_512x1024_80k_cityscapes.py`` (ResNet-18 with the plain 7x7 stem) and
``deeplabv3plus_r50-d8_512x1024_40k_cityscapes.py`` (ResNetV1c-50):

* backbone: stage strides (1, 2, 1, 1), dilations (1, 1, 2, 4), ``contract_dilation=True`` -> stride 8;
* decode head (mmseg ``DepthwiseSeparableASPPHead``) on stage 4: image pooling + 1x1 + three depthwise
  separable 3x3 ASPP branches (dilations 12, 24, 36), a 3x3 bottleneck, up-sampling to stride 4, fusion
  with the 1x1-reduced stage-1 feature (c1), two depthwise separable 3x3 convs, dropout, 1x1 classifier;
* auxiliary FCN head on stage 3 (one 3x3 conv, loss weight 0.4), used in training only.

Module names and creation order are mmseg's, so its model-zoo checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from mirseg.models._blocks import (
    ConvModule,
    DepthwiseSeparableConvModule,
    FCNHead,
    init_weights,
    resize,
    upsample_logits,
)
from mirseg.models.resnet import ResNet

# depth -> (head channels, c1 channels, aux head channels), from the mmseg configs.
_HEAD_WIDTHS: dict[int, tuple[int, int, int]] = {
    18: (128, 12, 64),
    50: (512, 48, 256),
    101: (512, 48, 256),
}


class DepthwiseSeparableASPPHead(nn.Module):
    """mmseg's ``DepthwiseSeparableASPPHead``: ASPP on the deepest feature + c1 low-level decoder.

    Args:
        in_channels: channels of the deepest feature (ASPP input).
        channels: width of every ASPP branch and of the decoder.
        c1_in_channels: channels of the stage-1 feature.
        c1_channels: width the stage-1 feature is reduced to before fusion.
        num_classes: output classes.
        dilations: ASPP dilations; the first (1) is a plain 1x1 conv, the others depthwise separable 3x3.
        dropout: Dropout2d rate before the classifier.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        c1_in_channels: int,
        c1_channels: int,
        num_classes: int,
        dilations: tuple[int, ...] = (1, 12, 24, 36),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        # conv_seg first: mmseg's BaseDecodeHead creates it before the subclass's layers (key order).
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(in_channels, channels, 1))
        self.aspp_modules = nn.ModuleList(
            ConvModule(in_channels, channels, 1)
            if d == 1
            else DepthwiseSeparableConvModule(in_channels, channels, 3, padding=d, dilation=d)
            for d in dilations
        )
        self.bottleneck = ConvModule((len(dilations) + 1) * channels, channels, 3, padding=1)
        self.c1_bottleneck = ConvModule(c1_in_channels, c1_channels, 1)
        self.sep_bottleneck = nn.Sequential(
            DepthwiseSeparableConvModule(channels + c1_channels, channels, 3, padding=1),
            DepthwiseSeparableConvModule(channels, channels, 3, padding=1),
        )

    def forward(self, c1: torch.Tensor, c4: torch.Tensor) -> torch.Tensor:
        """``c1`` (N, C1, H/4, W/4), ``c4`` (N, C4, H/8, W/8) -> logits (N, num_classes, H/4, W/4)."""
        n, _, h, w = c4.shape
        # Bilinear up-sampling of a 1x1 map is a broadcast: expand() replaces the interpolation. Materialise
        # it in c4's memory format, else torch.cat falls back to NCHW and the next conv converts the layout.
        fmt = torch.channels_last if c4.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        pooled = self.image_pool(c4).expand(n, -1, h, w).contiguous(memory_format=fmt)  # (N, ch, h, w)
        cat = torch.cat([pooled] + [branch(c4) for branch in self.aspp_modules], dim=1)  # (N, 5 * ch, h, w)
        out = self.bottleneck(cat)  # (N, ch, h, w)
        low = self.c1_bottleneck(c1)  # (N, c1_ch, H/4, W/4)
        out = torch.cat([resize(out, low.shape[2:]), low], dim=1)  # (N, ch + c1_ch, H/4, W/4)
        out = self.sep_bottleneck(out)  # (N, ch, H/4, W/4)
        return self.conv_seg(self.dropout(out))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ with a ResNet-D8 backbone, as mmseg's ``deeplabv3plus_r{18,18b,50}-d8`` configs.

    Args:
        num_classes: output classes.
        depth: ResNet depth (18 or 50; 101 uses the R50 head widths).
        stem: ``"v1c"`` (deep stem, ResNetV1c) or ``"plain"`` (7x7 stem, the ``r18b`` config).

    ``forward(x)`` returns ``{"out": logits}`` (N, num_classes, H, W); in train mode also
    ``"aux": [aux_logits]`` from the FCN head on stage 3, whose loss weight is ``aux_weights[0]``.
    """

    aux_weights: tuple[float, ...] = (0.4,)

    def __init__(self, num_classes: int, depth: int = 50, stem: str = "v1c") -> None:
        super().__init__()
        if depth not in _HEAD_WIDTHS:
            raise ValueError(f"DeepLabV3Plus supports depth {sorted(_HEAD_WIDTHS)}, got {depth}")
        channels, c1_channels, aux_channels = _HEAD_WIDTHS[depth]
        self.backbone = ResNet(depth, stem, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True)
        widths = self.backbone.out_channels
        self.decode_head = DepthwiseSeparableASPPHead(widths[3], channels, widths[0], c1_channels, num_classes)
        self.auxiliary_head = FCNHead(widths[2], aux_channels, num_classes, num_convs=1)
        # The backbone initialised itself (incl. zero-init residual BNs); initialise the heads.
        init_weights(self.decode_head)
        init_weights(self.auxiliary_head)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        size = x.shape[2:]
        c1, _, c3, c4 = self.backbone(x)
        out = {"out": upsample_logits(self.decode_head(c1, c4), size)}  # (N, num_classes, H, W) fp32
        if self.training:
            out["aux"] = [upsample_logits(self.auxiliary_head(c3), size)]
        return out
