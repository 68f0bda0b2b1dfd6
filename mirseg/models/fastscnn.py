"""Fast-SCNN: Fast Semantic Segmentation Network (Poudel et al., 2019, arXiv 1902.04502).

This mirrors mmsegmentation 0.27's ``configs/fastscnn/fast_scnn_lr0.12_8x4_160k_cityscapes.py``:
the ``FastSCNN`` backbone, a ``DepthwiseSeparableFCNHead`` decode head on the fusion output and two
``FCNHead`` auxiliary heads (on the global feature and on the learning-to-downsample output), all
with BatchNorm momentum 0.01. Module names and creation order are mmseg's, so model-zoo checkpoints
load with ``strict=True``.

Data flow for a ``(N, 3, H, W)`` input (strides relative to the input):

    learning_to_downsample   -> higher (N, 64, H/8, W/8)
    global_feature_extractor -> lower  (N, 128, H/32, W/32)
    feature_fusion(higher, lower) -> fused (N, 128, H/8, W/8)
    decode_head(fused) -> logits (N, K, H/8, W/8) -> bilinear to (H, W)
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

BN_MOMENTUM = 0.01  # the config's norm_cfg (SyncBN, momentum=0.01)


class InvertedResidual(nn.Module):
    """MobileNetV2 bottleneck: 1x1 expand (ReLU) -> 3x3 depthwise (ReLU) -> 1x1 project (no act).

    mmseg's FastSCNN passes its ``act_cfg`` (ReLU) down, so the activations are ReLU, not MobileNetV2's
    ReLU6. The identity shortcut is used only when stride is 1 and the channel count is unchanged.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int = 6) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_res_connect = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            ConvModule(in_channels, hidden, 1, bn_momentum=BN_MOMENTUM),
            ConvModule(hidden, hidden, 3, stride, 1, groups=hidden, bn_momentum=BN_MOMENTUM),
            ConvModule(hidden, out_channels, 1, act=False, bn_momentum=BN_MOMENTUM),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class LearningToDownsample(nn.Module):
    """3x3 s2 conv (3->32, ReLU), then two depthwise-separable s2 convs (32->48->64): stride 8.

    The depthwise halves have BN but no activation (mmseg's ``dw_act_cfg=None``); the pointwise
    halves have BN and ReLU.
    """

    def __init__(self, in_channels: int = 3, dw_channels: tuple[int, int] = (32, 48), out_channels: int = 64) -> None:
        super().__init__()
        c1, c2 = dw_channels
        self.conv = ConvModule(in_channels, c1, 3, stride=2, padding=1, bn_momentum=BN_MOMENTUM)
        self.dsconv1 = DepthwiseSeparableConvModule(c1, c2, 3, stride=2, padding=1, dw_act=False,
                                                    bn_momentum=BN_MOMENTUM)
        self.dsconv2 = DepthwiseSeparableConvModule(c2, out_channels, 3, stride=2, padding=1, dw_act=False,
                                                    bn_momentum=BN_MOMENTUM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, 3, H, W) -> (N, 32, H/2, W/2) -> (N, 48, H/4, W/4) -> (N, 64, H/8, W/8)
        return self.dsconv2(self.dsconv1(self.conv(x)))


class GlobalFeatureExtractor(nn.Module):
    """Three groups of inverted residuals (64 s2, 96 s2, 128 s1), PSP pooling, 3x3 conv 256->128."""

    def __init__(
        self,
        in_channels: int = 64,
        block_channels: tuple[int, int, int] = (64, 96, 128),
        out_channels: int = 128,
        num_blocks: tuple[int, int, int] = (3, 3, 3),
        strides: tuple[int, int, int] = (2, 2, 1),
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
    ) -> None:
        super().__init__()
        ins = (in_channels, *block_channels[:2])
        self.bottleneck1 = self._make_group(ins[0], block_channels[0], num_blocks[0], strides[0])
        self.bottleneck2 = self._make_group(ins[1], block_channels[1], num_blocks[1], strides[1])
        self.bottleneck3 = self._make_group(ins[2], block_channels[2], num_blocks[2], strides[2])
        c = block_channels[2]
        # mmseg's PPM: per scale, Sequential(adaptive avg pool, 1x1 ConvModule c -> c/4); keys ppm.<i>.1.*
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(c, c // 4, 1, bn_momentum=BN_MOMENTUM))
            for s in pool_scales
        )
        self.out = ConvModule(c * 2, out_channels, 3, padding=1, bn_momentum=BN_MOMENTUM)

    @staticmethod
    def _make_group(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [InvertedResidual(in_channels, out_channels, stride)]
        layers += [InvertedResidual(out_channels, out_channels, 1) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, 64, H/8, W/8) -> (N, 64, H/16) -> (N, 96, H/32) -> (N, 128, H/32, W/32)
        x = self.bottleneck3(self.bottleneck2(self.bottleneck1(x)))
        size = x.shape[-2:]
        # input first, then each pooled branch upsampled back: (N, 128 + 4 * 32, H/32, W/32)
        x = torch.cat([x, *(resize(branch(x), size) for branch in self.ppm)], dim=1)
        return self.out(x)


class FeatureFusionModule(nn.Module):
    """Upsample the low-res feature, depthwise 3x3 (ReLU) + 1x1 (no act); 1x1 (no act) on the high-res
    feature; sum, then ReLU."""

    def __init__(self, higher_in_channels: int = 64, lower_in_channels: int = 128, out_channels: int = 128) -> None:
        super().__init__()
        self.dwconv = ConvModule(lower_in_channels, out_channels, 3, padding=1, groups=out_channels,
                                 bn_momentum=BN_MOMENTUM)
        self.conv_lower_res = ConvModule(out_channels, out_channels, 1, act=False, bn_momentum=BN_MOMENTUM)
        self.conv_higher_res = ConvModule(higher_in_channels, out_channels, 1, act=False, bn_momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, higher: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        lower = resize(lower, higher.shape[-2:])  # (N, 128, H/32, W/32) -> (N, 128, H/8, W/8)
        lower = self.conv_lower_res(self.dwconv(lower))
        return self.relu(self.conv_higher_res(higher) + lower)


class FastSCNNBackbone(nn.Module):
    """mmseg's ``FastSCNN`` backbone; returns ``(higher, lower, fused)`` like its ``out_indices=(0, 1, 2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.learning_to_downsample = LearningToDownsample()
        self.global_feature_extractor = GlobalFeatureExtractor()
        self.feature_fusion = FeatureFusionModule()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        higher = self.learning_to_downsample(x)  # (N, 64, H/8, W/8)
        lower = self.global_feature_extractor(higher)  # (N, 128, H/32, W/32)
        return higher, lower, self.feature_fusion(higher, lower)


def _to_input_size(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Bilinear logits -> input size, fp32. The (N, K, H/8, W/8) map is made NCHW-contiguous first: on CPU the
    channels-last upsampling kernel is ~20% slower, and this copy is 64x smaller than the output."""
    return upsample_logits(logits.contiguous(), size)


class FastSCNN(nn.Module):
    """Fast-SCNN segmentor: backbone, depthwise-separable FCN decode head, two FCN auxiliary heads.

    ``forward`` returns ``{"out": logits}`` at the input size, plus ``"aux"`` (global-feature head
    first, then learning-to-downsample head, as in the config's ``auxiliary_head`` list) in train mode.
    """

    aux_weights: tuple[float, ...] = (0.4, 0.4)

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.aux_weights = (0.4, 0.4)
        self.backbone = FastSCNNBackbone()
        # DepthwiseSeparableFCNHead: an FCNHead (conv_seg created first) whose two convs are swapped for
        # depthwise-separable ones (no activation after the depthwise part); concat_input=False.
        # Reassigning ``convs`` keeps its slot after ``conv_seg``, so the state_dict order stays mmseg's.
        self.decode_head = FCNHead(128, 128, num_classes, num_convs=2, bn_momentum=BN_MOMENTUM)
        self.decode_head.convs = nn.Sequential(*(
            DepthwiseSeparableConvModule(128, 128, 3, padding=1, dw_act=False, bn_momentum=BN_MOMENTUM)
            for _ in range(2)
        ))
        self.auxiliary_head = nn.ModuleList([
            FCNHead(128, 32, num_classes, num_convs=1, bn_momentum=BN_MOMENTUM),  # on lower (in_index=-2)
            FCNHead(64, 32, num_classes, num_convs=1, bn_momentum=BN_MOMENTUM),  # on higher (in_index=-3)
        ])
        init_weights(self)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        size = x.shape[-2:]
        higher, lower, fused = self.backbone(x)
        out: dict[str, torch.Tensor | list[torch.Tensor]] = {"out": _to_input_size(self.decode_head(fused), size)}
        if self.training:
            out["aux"] = [
                _to_input_size(self.auxiliary_head[0](lower), size),
                _to_input_size(self.auxiliary_head[1](higher), size),
            ]
        return out
