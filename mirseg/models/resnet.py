"""ResNet backbones for segmentation (He et al. 2016, "Deep Residual Learning for Image Recognition").

Two stems are supported:

* ``"plain"``: the original 7x7/2 conv + BN + ReLU (mmseg's ``ResNet``; attributes ``conv1``/``bn1``);
* ``"v1c"``: the "deep stem" of ResNetV1c (He et al. 2019, "Bag of Tricks"): three 3x3 convs
  (``stem_channels // 2``, ``stem_channels // 2``, ``stem_channels``; the first with stride 2) in an
  ``nn.Sequential`` named ``stem`` (mmseg's ``ResNetV1c``).

Both are followed by a 3x3/2 max-pool and four residual stages ``layer1`` .. ``layer4``. Strides sit in
the 3x3 conv of a block (mmseg's ``style='pytorch'``). Dilated variants (e.g. the D8 backbones of
mmseg's DeepLab configs: stage strides ``(1, 2, 1, 1)``, dilations ``(1, 1, 2, 4)``) keep the stride-8
resolution; with ``contract_dilation`` the first block of a dilated stage uses half the dilation.

This mirrors mmsegmentation 0.27's ``mmseg/models/backbones/resnet.py`` as used by its configs:
module names and creation order are mmseg's, so its checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from mirseg.models._blocks import init_weights


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34).

    As in mmseg, only ``conv1`` carries the stride and the dilation; ``conv2`` is a plain 3x3 conv.
    """

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        # Creation order conv1, bn1, conv2, bn2, downsample is mmseg's state_dict order.
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.Module:
        """The BatchNorm before the residual sum (zero-initialised when training from scratch)."""
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # in place: `out` is a fresh tensor, saves one full-size allocation
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride, dilation) -> 1x1 expand (x4), with a residual connection (ResNet-50+)."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        width_out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # style='pytorch': the stride is in the 3x3 conv, not in the first 1x1.
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.Module:
        """The BatchNorm before the residual sum (zero-initialised when training from scratch)."""
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


# depth -> (block, blocks per stage)
ARCH_SETTINGS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def make_res_layer(
    block: type[BasicBlock] | type[Bottleneck],
    inplanes: int,
    planes: int,
    num_blocks: int,
    stride: int = 1,
    dilation: int = 1,
    contract_dilation: bool = False,
) -> nn.Sequential:
    """One ResNet stage (mmseg's ``ResLayer``): the first block changes stride/width, the rest keep them."""
    out_planes = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out_planes:
        # Projection shortcut: strided 1x1 conv + BN (``downsample.0`` / ``downsample.1``).
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, out_planes, 1, stride, bias=False),
            nn.BatchNorm2d(out_planes),
        )
    first_dilation = dilation // 2 if contract_dilation and dilation > 1 else dilation
    layers = [block(inplanes, planes, stride, first_dilation, downsample)]
    layers += [block(out_planes, planes, 1, dilation) for _ in range(1, num_blocks)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """ResNet backbone returning the four stage outputs ``(c1, c2, c3, c4)``.

    Args:
        depth: 18, 34, 50, 101 or 152.
        stem: ``"v1c"`` (deep 3x3 stem, mmseg ``ResNetV1c``) or ``"plain"`` (7x7 stem, mmseg ``ResNet``).
        strides: stride of each stage's first block.
        dilations: dilation of each stage.
        contract_dilation: halve the dilation of the first block of a dilated stage.
        stem_channels: width of the stem output (64 in every mmseg config).
        base_channels: width of the first stage's 3x3 convs; doubles every stage.
        zero_init_residual: zero the last BN gamma of every block, as mmseg does when training from
            scratch (each residual block then starts as the identity).

    Attributes:
        out_channels: channels of each returned feature map.
        strides: output stride of each returned feature map w.r.t. the input (e.g. 4, 8, 8, 8 for D8).
    """

    def __init__(
        self,
        depth: int = 50,
        stem: str = "v1c",
        strides: tuple[int, ...] = (1, 2, 2, 2),
        dilations: tuple[int, ...] = (1, 1, 1, 1),
        contract_dilation: bool = False,
        stem_channels: int = 64,
        base_channels: int = 64,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        if depth not in ARCH_SETTINGS:
            raise ValueError(f"invalid ResNet depth {depth}; choose one of {sorted(ARCH_SETTINGS)}")
        if stem not in ("v1c", "plain"):
            raise ValueError(f"stem must be 'v1c' or 'plain', got {stem!r}")
        if len(strides) != 4 or len(dilations) != 4:
            raise ValueError("strides and dilations need one entry per stage (4)")
        block, stage_blocks = ARCH_SETTINGS[depth]
        self.deep_stem = stem == "v1c"

        if self.deep_stem:
            half = stem_channels // 2
            # Conv2d/BatchNorm2d pairs inside a Sequential: keys stem.{0,1,3,4,6,7}, foldable by fuse_conv_bn.
            self.stem = nn.Sequential(
                nn.Conv2d(3, half, 3, 2, 1, bias=False),
                nn.BatchNorm2d(half),
                nn.ReLU(inplace=True),
                nn.Conv2d(half, half, 3, 1, 1, bias=False),
                nn.BatchNorm2d(half),
                nn.ReLU(inplace=True),
                nn.Conv2d(half, stem_channels, 3, 1, 1, bias=False),
                nn.BatchNorm2d(stem_channels),
                nn.ReLU(inplace=True),
            )
        else:
            self.conv1 = nn.Conv2d(3, stem_channels, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_channels)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)

        inplanes, out_channels, out_strides, total_stride = stem_channels, [], [], 4
        for i, num_blocks in enumerate(stage_blocks):
            planes = base_channels * 2**i
            layer = make_res_layer(block, inplanes, planes, num_blocks, strides[i], dilations[i], contract_dilation)
            self.add_module(f"layer{i + 1}", layer)
            inplanes = planes * block.expansion
            total_stride *= strides[i]
            out_channels.append(inplanes)
            out_strides.append(total_stride)
        self.out_channels: tuple[int, ...] = tuple(out_channels)
        self.strides: tuple[int, ...] = tuple(out_strides)

        init_weights(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x`` (N, 3, H, W) -> four maps (N, out_channels[i], ~H / strides[i], ~W / strides[i])."""
        if self.deep_stem:
            x = self.stem(x)  # (N, 64, H/2, W/2)
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)  # (N, 64, H/4, W/4)
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return c1, c2, c3, c4
