"""nnU-Net's loss: cross-entropy plus soft Dice, with deep supervision, and partial labels.

`dice_ce` is nnU-Net v2's DC_and_CE_loss with MemoryEfficientSoftDiceLoss: CE + (-soft Dice), Dice
over the foreground classes only (do_bg = False), smooth 1e-5, averaged over samples and classes
(or, with batch_dice, per class over the whole batch, gathered across torchrun ranks). Like
nnU-Net's, the loss is negative once Dice exceeds the cross-entropy; a perfect prediction scores -1.

Partial labels (the marginal loss of Shi et al., MedIA 2021): in a case whose source dataset
annotates only some classes, an unannotated organ or lesion is still labelled background, so a
prediction of such a class there is not wrong. For that case the probabilities of the unannotated
classes are added to the background's before both terms (CE uses log-sum-exp of their logits, stable),
and Dice is averaged over its annotated classes only. A case annotating no class at all then adds no
gradient. Fully labelled cases are unaffected.

`deep_supervision_loss` weights the decoder's outputs 1, 1/2, 1/4, ... (highest resolution first),
sets the lowest resolution's weight to 0 and normalises the rest to sum to 1, as nnU-Net does; the
labels are downsampled to each output by nearest neighbour ('nearest-exact', as nnU-Net).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

DICE_SMOOTH = 1e-5


def merged_log_probs(logits: torch.Tensor, labelled: torch.Tensor | None) -> torch.Tensor:
    """log-softmax over classes (b, k, *s); with `labelled` (b, k) bool, the unlabelled classes of a
    sample are merged into its background (column 0) and their own columns set to -inf."""
    log_probs = F.log_softmax(logits.float(), 1)
    if labelled is None:
        return log_probs
    labelled = labelled.clone()
    labelled[:, 0] = True
    shape = (*labelled.shape, *([1] * (logits.ndim - 2)))
    into_background = ~labelled
    into_background[:, 0] = True
    background = torch.logsumexp(log_probs.masked_fill(~into_background.view(shape), float("-inf")), 1, keepdim=True)
    rest = log_probs[:, 1:].masked_fill(~labelled[:, 1:].view(shape[0], -1, *shape[2:]), float("-inf"))
    return torch.cat([background, rest], 1)


def soft_dice(
    probs: torch.Tensor, target: torch.Tensor, class_mask: torch.Tensor | None, *, batch_dice: bool = False
) -> torch.Tensor:
    """Mean soft Dice of the foreground classes. probs (b, k, *s); target (b, *s) int64;
    class_mask (b, k) bool of the classes annotated per sample (None: all)."""
    axes = tuple(range(2, probs.ndim))
    with torch.no_grad():
        onehot = torch.zeros_like(probs).scatter_(1, target[:, None], 1)[:, 1:]
    x = probs[:, 1:]
    intersect = (x * onehot).sum(axes)
    sum_pred = x.sum(axes)
    sum_gt = onehot.sum(axes)
    mask = torch.ones_like(sum_gt) if class_mask is None else class_mask[:, 1:].to(sum_gt)
    if batch_dice:
        # per class over the batch (and all ranks), counting only the samples that annotate the class
        intersect, sum_pred, sum_gt = (_gather_sum(t * mask) for t in (intersect, sum_pred, sum_gt))
        mask = (_gather_sum(mask.detach()) > 0).to(sum_gt)
    dice = (2 * intersect + DICE_SMOOTH) / (sum_gt + sum_pred + DICE_SMOOTH).clamp_min(1e-8)
    return (dice * mask).sum() / mask.sum().clamp_min(1)


def _gather_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the batch and, under torchrun, over all ranks, keeping gradients."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_gather

        t = torch.cat(all_gather(t), 0)
    return t.sum(0)


def dice_ce(
    logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor | None = None, *, batch_dice: bool = False
) -> torch.Tensor:
    """CE - soft Dice. logits (b, k, *s), target (b, *s) integer labels, labelled (b, k) bool or None."""
    target = target.long()
    log_probs = merged_log_probs(logits, labelled)
    ce = F.nll_loss(log_probs, target)
    dice = soft_dice(log_probs.exp(), target, labelled, batch_dice=batch_dice)
    return ce - dice


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """1, 1/2, 1/4, ... with the lowest resolution's set to 0, normalised to sum to 1."""
    weights = [1 / 2**i for i in range(n_outputs)]
    if n_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def downsample_labels(target: torch.Tensor, shape_zyx: tuple[int, ...]) -> torch.Tensor:
    if tuple(target.shape[1:]) == tuple(shape_zyx):
        return target
    return F.interpolate(target[:, None].float(), size=shape_zyx, mode="nearest-exact")[:, 0].long()


def deep_supervision_loss(
    outputs: list[torch.Tensor] | tuple[torch.Tensor, ...] | torch.Tensor,
    target: torch.Tensor,
    labelled: torch.Tensor | None = None,
    *,
    batch_dice: bool = False,
) -> torch.Tensor:
    """Weighted dice_ce over the decoder's outputs (highest resolution first), or of one output."""
    if isinstance(outputs, torch.Tensor):
        return dice_ce(outputs, target, labelled, batch_dice=batch_dice)
    loss = outputs[0].new_zeros((), dtype=torch.float32)
    for output, weight in zip(outputs, deep_supervision_weights(len(outputs)), strict=True):
        if weight == 0:
            # keep the head in the graph with a zero gradient: DDP demands a gradient for every
            # parameter (nnU-Net gives it weight 1e-6 instead, which trains it a little)
            loss = loss + 0.0 * output.float().sum()
            continue
        loss = loss + weight * dice_ce(output, downsample_labels(target, output.shape[2:]), labelled,
                                       batch_dice=batch_dice)
    return loss
