"""OCRNet: object-contextual representations on an HRNetV2 backbone.

OCR (Yuan et al. 2020, "Object-Contextual Representations for Semantic Segmentation", arXiv 1909.11065)
first predicts coarse class maps ("soft object regions"), pools the pixel features into one vector per
class with those maps, then lets every pixel attend over the class vectors and appends the attended
context to its own feature before classifying.

This mirrors mmsegmentation 0.27's ``CascadeEncoderDecoder`` with the configs
``configs/ocrnet/ocrnet_hr18s_512x1024_40k_cityscapes.py`` and ``ocrnet_hr18_512x1024_40k_cityscapes.py``:
``decode_head[0]`` is the FCN head of ``fcn_hr18`` (its logits are the soft object regions, loss weight
0.4) and ``decode_head[1]`` is ``OCRHead`` (channels 512, ocr_channels 256, scale 1, no dropout), with
mmseg's module names and creation order so model-zoo checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from mirseg.models._blocks import ConvModule, FCNHead, init_weights, upsample_logits
from mirseg.models.hrnet import HRNetV2, resize_concat


def full_precision(x: torch.Tensor) -> torch.autocast:
    """A block where autocast is off on ``x``'s device: the ops inside run in their inputs' dtype (cast to fp32)."""
    return torch.autocast(x.device.type, enabled=False)


def spatial_gather(feats: torch.Tensor, region_logits: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Class centres: each class's softmax over positions weights the pixel features.

    ``feats`` (N, C, H, W), ``region_logits`` (N, K, H, W) -> (N, C, K, 1), the layout mmseg feeds
    to the key/value 1x1 convs (so their BatchNorm sees the same N*K samples in training). In fp32
    under autocast: a softmax over H*W positions gives weights near 1/(H*W), and each centre sums H*W of them.
    """
    with full_precision(feats):
        probs = torch.softmax(scale * region_logits.flatten(2).float(), dim=2)  # (N, K, H*W)
        centres = torch.bmm(probs, feats.flatten(2).transpose(1, 2).float())  # (N, K, C)
    return centres.transpose(1, 2).unsqueeze(3)  # (N, C, K, 1)


class ObjectAttentionBlock(nn.Module):
    """mmseg's ``ObjectAttentionBlock``: pixel queries attend over class-centre keys/values, then the
    context (projected back to ``in_channels``) is concatenated with the pixel feature and fused 1x1."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.channels = channels
        # _SelfAttentionBlock's creation order: key, query, value, out; then the fusion bottleneck
        self.key_project = nn.Sequential(ConvModule(in_channels, channels, 1), ConvModule(channels, channels, 1))
        self.query_project = nn.Sequential(ConvModule(in_channels, channels, 1), ConvModule(channels, channels, 1))
        self.value_project = ConvModule(in_channels, channels, 1)
        self.out_project = ConvModule(channels, in_channels, 1)
        self.bottleneck = ConvModule(in_channels * 2, in_channels, 1)

    def forward(self, feats: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        n, _, h, w = feats.shape
        query = self.query_project(feats).flatten(2).transpose(1, 2)  # (N, H*W, C'), no copy if channels_last
        key = self.key_project(centres).flatten(2)  # (N, C', K)
        value = self.value_project(centres).flatten(2).transpose(1, 2)  # (N, K, C')
        with full_precision(feats):  # the attention (<1% of the FLOPs) in fp32 under autocast, softmax included
            sim = torch.bmm(query.float(), key.float()).mul_(self.channels**-0.5)  # (N, H*W, K), mmseg's matmul_norm
            context = torch.bmm(sim.softmax(dim=-1), value.float())  # (N, H*W, C')
        # (N, C', H, W) as a view: channels_last strides, which the 1x1 conv takes as is
        context = self.out_project(context.transpose(1, 2).view(n, self.channels, h, w))  # (N, C, H, W)
        return self.bottleneck(torch.cat([context, feats], dim=1))


class OCRHead(nn.Module):
    """mmseg's ``OCRHead``: 3x3 ConvModule to ``channels``, spatial gather, object attention, 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 512, ocr_channels: int = 256) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)  # created first by BaseDecodeHead
        self.object_context_block = ObjectAttentionBlock(channels, ocr_channels)
        self.bottleneck = ConvModule(in_channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, region_logits: torch.Tensor) -> torch.Tensor:
        feats = self.bottleneck(x)  # (N, 512, h, w): pixel representations
        centres = spatial_gather(feats, region_logits)  # (N, 512, K, 1)
        return self.conv_seg(self.object_context_block(feats, centres))  # (N, K, h, w)


class OCRNet(nn.Module):
    """HRNetV2 + cascade [FCN head (soft object regions), OCR head]; ``out`` is the OCR head's logits."""

    aux_weights: tuple[float, ...] = (0.4,)

    def __init__(self, num_classes: int, small: bool = False) -> None:
        super().__init__()
        self.backbone = HRNetV2(small)
        ch = sum(self.backbone.out_channels)  # 270
        self.decode_head = nn.ModuleList([
            FCNHead(ch, ch, num_classes, num_convs=1, kernel_size=1, dropout=0.0),
            OCRHead(ch, num_classes),
        ])
        init_weights(self)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        # Both heads take the same resize-concat of the backbone maps, so it is computed once.
        feats = resize_concat(self.backbone(x))  # (N, 270, H/4, W/4)
        regions = self.decode_head[0](feats)  # (N, K, H/4, W/4)
        # Not detached: as in mmseg, the OCR loss also trains the region head. (mmseg runs that head twice
        # in training, once per loss, with identical outputs; we run it once.)
        logits = self.decode_head[1](feats, regions)  # (N, K, H/4, W/4)
        out: dict[str, torch.Tensor | list[torch.Tensor]] = {"out": upsample_logits(logits, x.shape[-2:])}
        if self.training:
            out["aux"] = [upsample_logits(regions, x.shape[-2:])]
        return out
