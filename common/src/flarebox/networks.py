"""Networks of our own, beside the nnU-Net classes that dynamic-network-architectures provides.

`LightUNet` is the lightweight 2.5D network of a published FLARE Task 2 entry (FZU, FLARE.md): a U-Net
whose encoder and decoder are built of depthwise-separable convolutions with GroupNorm, each encoder
stage ending in efficient channel attention (ECA), 16 base channels, reading 3 adjacent slices as
channels and segmenting the middle one.

To the engine it is a 3D network like any other: it takes a (b, c, z, y, x) tile and returns
(b, k, z, y, x) logits. Inside, every slice of the tile becomes one sample of a batch, stacked with
its neighbours (the tile's first and last slices repeat themselves for the neighbour they lack), and
the 2D U-Net runs on that batch at once. The sliding window (sliding_window.py) overlaps tiles along
z by the neighbours a slice needs and weights a tile's edge slices almost nothing, so every slice of
a scan is segmented from its true neighbours, as a slice-by-slice loop would do it, in a few batched
calls. Training takes the same tiles (trainer.py scores only the slices with true neighbours).

Only torch-based code imports this module (models.build_network); the CPU image runs the IR.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """ECA-Net's adaptive kernel size: |log2(C) / gamma + b / gamma|, the nearest odd size up."""
    k = int(abs(math.log2(channels) / gamma + b / gamma))
    return k if k % 2 else k + 1


class ECA(nn.Module):
    """Efficient channel attention: each channel is scaled by sigmoid(1D convolution, across the
    channels, of the channels' spatial means); k weights in all, no dimensionality reduction."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        k = eca_kernel_size(channels)
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = x.mean(dim=(2, 3))  # (b, c)
        gate = torch.sigmoid(self.conv(means[:, None, :]))[:, 0]  # (b, c)
        return x * gate[:, :, None, None]


def group_count(channels: int, groups: int) -> int:
    """The groups of a GroupNorm over `channels`: `groups`, or fewer where the channels do not divide."""
    return math.gcd(channels, groups)


class SeparableConv(nn.Module):
    """Depthwise 3x3 convolution (stride s), pointwise 1x1 to c_out, GroupNorm, LeakyReLU: a 3x3
    convolution's reach for c_in * 9 + c_in * c_out weights instead of c_in * c_out * 9."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 8) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in)
        self.pointwise = nn.Conv2d(c_in, c_out, 1)
        self.norm = nn.GroupNorm(group_count(c_out, groups), c_out, eps=1e-5)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.pointwise(self.depthwise(x))))


class PlainConv(nn.Module):
    """A standard 3x3 convolution, GroupNorm, LeakyReLU: the full-resolution stage's, where 16
    channels make its weights few and a separable one would lose the most."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(group_count(c_out, groups), c_out, eps=1e-5)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class EncoderStage(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, convs: int, groups: int, separable: bool) -> None:
        super().__init__()
        conv = SeparableConv if separable else PlainConv
        layers = [conv(c_in, c_out, stride, groups)]
        layers += [conv(c_out, c_out, 1, groups) for _ in range(convs - 1)]
        self.convs = nn.Sequential(*layers)
        self.attention = ECA(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.convs(x))


class DecoderStage(nn.Module):
    """2x2 transposed convolution up, concatenation with the encoder's skip, separable convolutions."""

    def __init__(self, c_below: int, c_out: int, stride: int, convs: int, groups: int, separable: bool) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(c_below, c_out, stride, stride=stride)
        conv = SeparableConv if separable else PlainConv
        layers = [conv(2 * c_out, c_out, 1, groups)]
        layers += [conv(c_out, c_out, 1, groups) for _ in range(convs - 1)]
        self.convs = nn.Sequential(*layers)

    def forward(self, below: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([self.up(below), skip], dim=1))


class LightUNet(nn.Module):
    """The 2.5D network (module docstring). Built by models.build_network from a plan's
    `arch_kwargs` as nnU-Net builds its own classes: input_channels and num_classes from the plan.

    slices: adjacent slices per sample (odd; 3 as published), times input_channels network inputs.
    features_per_stage, strides (2D, per stage; the first is usually 1), convs_per_stage: the U-Net.
    norm_groups: GroupNorm's groups. deep_supervision: accepted for the trainer's interface; this
    network has one output (as published).
    """

    def __init__(self, input_channels: int, num_classes: int, *, slices: int = 3,
                 features_per_stage: tuple[int, ...] | list[int] = (16, 32, 64, 128, 256),
                 strides: tuple | list = ((1, 1), (2, 2), (2, 2), (2, 2), (2, 2)),
                 convs_per_stage: int = 2, norm_groups: int = 8, deep_supervision: bool = False) -> None:
        super().__init__()
        if slices < 1 or slices % 2 == 0:
            raise ValueError(f"slices must be odd and positive, got {slices}")
        if len(strides) != len(features_per_stage):
            raise ValueError("strides needs one entry per stage")
        if any(s[0] != s[1] for s in strides):
            raise ValueError(f"strides must be square in-plane, got {strides}")
        self.slices, self.num_classes = slices, num_classes
        features = [int(f) for f in features_per_stage]
        steps = [int(s[0]) for s in strides]
        self.encoder = nn.ModuleList()
        c_in = input_channels * slices
        # stages at full resolution (no stride so far) convolve plainly, the others separably
        separable = [math.prod(steps[:i + 1]) > 1 for i in range(len(steps))]
        for c_out, stride, sep in zip(features, steps, separable, strict=True):
            self.encoder.append(EncoderStage(c_in, c_out, stride, convs_per_stage, norm_groups, sep))
            c_in = c_out
        self.decoder = nn.ModuleList(
            DecoderStage(features[i + 1], features[i], steps[i + 1], convs_per_stage, norm_groups, separable[i])
            for i in reversed(range(len(features) - 1)))
        self.head = nn.Conv2d(features[0], num_classes, 1)

    def forward_slices(self, stacks: torch.Tensor) -> torch.Tensor:
        """(n, c * slices, y, x) -> (n, k, y, x): the 2D U-Net on a batch of slice stacks."""
        skips = []
        x = stacks
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        for stage, skip in zip(self.decoder, reversed(skips[:-1]), strict=True):
            x = stage(x, skip)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, z, y, x) -> (b, k, z, y, x): each slice from itself and its neighbours."""
        b, c, z, h, w = x.shape
        half = self.slices // 2
        # the tile's end slices repeat for the neighbours beyond the tile (weighted ~0 by the sliding window)
        padded = F.pad(x, (0, 0, 0, 0, half, half), mode="replicate") if half else x
        # (b, c, slices, z, y, x): channel (i, j) of slice t is input channel i of slice t - half + j
        stacked = torch.stack([padded[:, :, j:j + z] for j in range(self.slices)], dim=2)
        stacks = stacked.permute(0, 3, 1, 2, 4, 5).reshape(b * z, c * self.slices, h, w)
        logits = self.forward_slices(stacks)
        return logits.reshape(b, z, self.num_classes, h, w).permute(0, 2, 1, 3, 4)
