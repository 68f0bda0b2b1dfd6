"""HRNetV2 backbone and the FCN segmentor on it.

HRNetV2 (Wang et al. 2019, "Deep High-Resolution Representation Learning for Visual Recognition",
arXiv 1908.07919) keeps a 1/4-resolution branch from the stem to the output and adds a 1/8, 1/16 and
1/32 branch stage by stage; every HR module ends with a multi-resolution fusion in which each branch
receives the sum of all branches resampled to its resolution. HRNetV2 outputs all four branches.

This mirrors mmsegmentation 0.27's ``HRNet`` backbone with the configs
``configs/hrnet/fcn_hr18s_512x1024_40k_cityscapes.py`` (W18-Small) and ``fcn_hr18_512x1024_40k_cityscapes.py``
(W18): same module names and creation order (so model-zoo checkpoints load with ``strict=True``) and the
same arithmetic, including mmseg's two-step up-sampling in the fusion (by 2**k, then to the exact size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mirseg.models._blocks import FCNHead, init_weights, resize, upsample_logits

WIDTHS = (18, 36, 72, 144)  # W18: branch widths at strides 4, 8, 16, 32

# (stage-1 Bottleneck count, HR modules in stages 2/3/4, BasicBlocks per branch), from the mmseg configs
_DEPTHS = {
    True: (2, (1, 3, 2), 2),  # W18-Small
    False: (4, (1, 4, 3), 4),  # W18
}


def _conv_bn(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, relu: bool = False) -> nn.Sequential:
    """``Sequential(Conv2d, BatchNorm2d[, ReLU])``: mmseg HRNet's unnamed conv/norm pairs (keys ``.0``/``.1``)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs), mmseg naming ``conv1/bn1/conv2/bn2``."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x  # the block's own output, safe to add into
        return self.relu(out)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3, 1x1, expansion 4) of HRNet's stage 1, mmseg naming."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        # mmseg creates the projection shortcut after the convs (it is passed in as ``downsample``)
        self.downsample = _conv_bn(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


def _upsample(x: torch.Tensor, factor: int, size: torch.Size) -> torch.Tensor:
    """mmseg's fusion up-sampling: ``Upsample(scale_factor=factor)`` then a resize to the exact target size.

    The second step is a no-op unless the input size is not a multiple of the branch stride (odd sizes),
    where mmseg's two-step interpolation differs slightly from a single resize; we keep it for parity.
    """
    h, w = x.shape[-2:]
    x = F.interpolate(x, size=(h * factor, w * factor), mode="bilinear", align_corners=False)
    return resize(x, size)


class HRModule(nn.Module):
    """Parallel branches of BasicBlocks followed by the all-to-all multi-resolution fusion."""

    def __init__(self, widths: tuple[int, ...], num_blocks: int) -> None:
        super().__init__()
        n = len(widths)
        self.branches = nn.ModuleList(
            nn.Sequential(*(BasicBlock(c, c) for _ in range(num_blocks))) for c in widths
        )
        # fuse_layers[i][j] brings branch j to branch i: None for i == j; for j > i a 1x1 conv + BN
        # (the up-sampling is done in forward, it has no weights); for j < i a chain of i - j stride-2
        # 3x3 conv + BN, with ReLU between them and the width changed only in the last one.
        fuse_layers = []
        for i in range(n):
            row: list[nn.Module | None] = []
            for j in range(n):
                if j > i:
                    row.append(_conv_bn(widths[j], widths[i], 1))
                elif j == i:
                    row.append(None)
                else:
                    steps = [_conv_bn(widths[j], widths[j], 3, 2, relu=True) for _ in range(i - j - 1)]
                    steps.append(_conv_bn(widths[j], widths[i], 3, 2))
                    row.append(nn.Sequential(*steps))
            fuse_layers.append(nn.ModuleList(row))
        self.fuse_layers = nn.ModuleList(fuse_layers)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        outs = []
        for i, row in enumerate(self.fuse_layers):
            size = xs[i].shape[-2:]
            y: torch.Tensor | None = None
            # Sum in mmseg's order j = 0..n-1. Every term except xs[i] is a fresh tensor (BN/conv or
            # interpolate output, none of which autograd needs), so we accumulate into it in place.
            for j, layer in enumerate(row):
                if layer is None:
                    t = xs[j]
                elif j > i:
                    t = _upsample(layer(xs[j]), 2 ** (j - i), size)
                else:
                    t = layer(xs[j])
                if y is None:
                    y = t
                elif y is xs[i]:
                    y = t.add_(y)  # i == 0: xs[0] + t, computed into t (addition is commutative bitwise)
                else:
                    y.add_(t)
            outs.append(torch.relu_(y))
        return outs


class HRNetV2(nn.Module):
    """HRNetV2-W18 / W18-Small backbone: returns 4 maps at strides ``strides`` with ``out_channels`` channels."""

    out_channels: tuple[int, ...] = WIDTHS
    strides: tuple[int, ...] = (4, 8, 16, 32)

    def __init__(self, small: bool = False) -> None:
        super().__init__()
        stage1_blocks, num_modules, num_blocks = _DEPTHS[small]
        # stem: two 3x3 stride-2 convs -> 1/4 resolution
        self.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        # stage 1: Bottlenecks, 64 -> 256 channels
        self.layer1 = nn.Sequential(
            *(Bottleneck(64 if k == 0 else 256, 64) for k in range(stage1_blocks))
        )
        pre: tuple[int, ...] = (64 * Bottleneck.expansion,)
        for s, modules in enumerate(num_modules):
            widths = WIDTHS[: s + 2]
            setattr(self, f"transition{s + 1}", self._transition(pre, widths))
            setattr(self, f"stage{s + 2}", nn.Sequential(*(HRModule(widths, num_blocks) for _ in range(modules))))
            pre = widths

    @staticmethod
    def _transition(pre: tuple[int, ...], cur: tuple[int, ...]) -> nn.ModuleList:
        """Adapt the previous stage's branches to the next: 3x3 conv where a width changes, None where it
        does not, and for each new branch a chain of stride-2 3x3 convs from the lowest-resolution branch."""
        layers: list[nn.Module | None] = []
        for i, c in enumerate(cur):
            if i < len(pre):
                layers.append(_conv_bn(pre[i], c, 3, relu=True) if c != pre[i] else None)
            else:
                extra = i + 1 - len(pre)
                layers.append(nn.Sequential(*(
                    _conv_bn(pre[-1], c if k == extra - 1 else pre[-1], 3, 2, relu=True) for k in range(extra)
                )))
        return nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        xs = [self.layer1(x)]  # (N, 256, H/4, W/4)
        for s in range(1, 4):
            transition: nn.ModuleList = getattr(self, f"transition{s}")
            # mmseg feeds every transition conv (new branches included) from the last branch
            xs = [xs[i] if t is None else t(xs[-1]) for i, t in enumerate(transition)]
            xs = getattr(self, f"stage{s + 1}")(xs)
        return xs  # [(N, 18, H/4, W/4), (N, 36, H/8, W/8), (N, 72, H/16, W/16), (N, 144, H/32, W/32)]


def resize_concat(feats: list[torch.Tensor]) -> torch.Tensor:
    """mmseg's ``input_transform='resize_concat'``: all maps resized to the first one's size, concatenated."""
    size = feats[0].shape[-2:]
    return torch.cat([resize(f, size) for f in feats], dim=1)


class HRNetFCN(nn.Module):
    """HRNetV2 + FCN head (mmseg ``fcn_hr18s`` / ``fcn_hr18``): one 1x1 ConvModule on the 270-channel concat."""

    aux_weights: tuple[float, ...] = ()

    def __init__(self, num_classes: int, small: bool = False) -> None:
        super().__init__()
        self.backbone = HRNetV2(small)
        ch = sum(self.backbone.out_channels)  # 270
        self.decode_head = FCNHead(ch, ch, num_classes, num_convs=1, kernel_size=1, dropout=0.0)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        feats = resize_concat(self.backbone(x))  # (N, 270, H/4, W/4)
        logits = upsample_logits(self.decode_head(feats), x.shape[-2:])  # (N, K, H, W) fp32
        out: dict[str, torch.Tensor | list[torch.Tensor]] = {"out": logits}
        if self.training:
            out["aux"] = []
        return out
