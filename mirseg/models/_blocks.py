"""Building blocks shared by the architectures.

Attribute names (``conv``, ``bn``, ``depthwise_conv``, ``pointwise_conv``, ``convs``, ``conv_seg``)
are mmsegmentation's, so model-zoo checkpoints load without a rename table. Module *creation
order* matters too: ``state_dict()`` lists keys in that order, and the parity fixtures pin it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize with ``align_corners=False``, as every mmseg head and segmentor does."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def upsample_logits(logits: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """The head's logits ``(N, K, h, w)`` resized to the input ``size``, in fp32 even under autocast.

    CPU autocast runs bilinear upsampling in bf16 when its input is bf16; the label is the argmax of
    these logits and the loss is taken on them, so they are computed in full precision (the cost: this
    one resize writes 4 bytes a value instead of 2, and the callers' ``.float()`` has nothing left to do).
    """
    return resize(logits.float(), size)


class ConvModule(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> optional ReLU; mmcv's ``ConvModule`` with a norm layer."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        act: bool = True,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, momentum=bn_momentum)
        if act:
            self.activate = nn.ReLU(inplace=True)


class DepthwiseSeparableConvModule(nn.Sequential):
    """Depthwise 3x3 ConvModule then pointwise 1x1 ConvModule (mmcv naming)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        dw_act: bool = True,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.depthwise_conv = ConvModule(
            in_channels, in_channels, kernel_size, stride, padding, dilation,
            groups=in_channels, act=dw_act, bn_momentum=bn_momentum,
        )
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1, bn_momentum=bn_momentum)


class FCNHead(nn.Module):
    """mmseg's ``FCNHead`` on a single feature map: ``num_convs`` ConvModules, dropout, 1x1 classifier.

    ``conv_seg`` is created first because mmseg's ``BaseDecodeHead`` creates it before the subclass
    adds its convs; the checkpoint key order follows.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        num_convs: int = 1,
        kernel_size: int = 3,
        concat_input: bool = False,
        dropout: float = 0.1,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        pad = kernel_size // 2
        layers = [
            ConvModule(in_channels if i == 0 else channels, channels, kernel_size, padding=pad,
                       bn_momentum=bn_momentum)
            for i in range(num_convs)
        ]
        self.convs = nn.Sequential(*layers) if layers else nn.Identity()
        self.concat_input = concat_input
        if concat_input:
            self.conv_cat = ConvModule(in_channels + channels, channels, kernel_size, padding=pad,
                                       bn_momentum=bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs(x)
        if self.concat_input:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.conv_seg(self.dropout(out))


def init_classifier(conv: nn.Conv2d) -> None:
    """mmseg initialises ``conv_seg`` with N(0, 0.01) and zero bias."""
    nn.init.normal_(conv.weight, 0.0, 0.01)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, ReLU), BN gamma 1 / beta 0, then N(0, 0.01) classifiers."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, m in module.named_modules():
        if name.endswith("conv_seg") and isinstance(m, nn.Conv2d):
            init_classifier(m)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv whose output equals ``bn(conv(x))`` in eval mode."""
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=True,
    ).to(conv.weight.device, conv.weight.dtype)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
    fused.weight.data.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.data.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


@torch.no_grad()
def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into the conv before it, in place; returns ``model``.

    Inference only (BN statistics are frozen in). The pairs it recognises are the conventions
    all our architectures follow: ``conv``/``bn`` children, ``convK``/``bnK`` children, and a
    ``Conv2d`` directly followed by a ``BatchNorm2d`` inside an ``nn.Sequential``.
    """
    for parent in list(model.modules()):
        children = dict(parent.named_children())
        pairs = []
        for name, child in children.items():
            if not isinstance(child, nn.BatchNorm2d):
                continue
            conv_name = "conv" + name[2:] if name.startswith("bn") else None
            if conv_name in children and isinstance(children[conv_name], nn.Conv2d):
                pairs.append((conv_name, name))
        if isinstance(parent, nn.Sequential):
            names = list(children)
            for a, b in zip(names, names[1:]):
                if isinstance(children[a], nn.Conv2d) and isinstance(children[b], nn.BatchNorm2d):
                    if (a, b) not in pairs:
                        pairs.append((a, b))
        for conv_name, bn_name in pairs:
            setattr(parent, conv_name, _fold(children[conv_name], children[bn_name]))
            setattr(parent, bn_name, nn.Identity())
    return model
