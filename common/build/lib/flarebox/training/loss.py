"""Dice + cross-entropy with deep supervision (nnU-Net's loss), with an option for partial labels.

Partial labels (Task 1, DKFZ): when a dataset annotates only some classes, the others may hide in
its background, so their predicted probability is added to the background's before the loss
(a marginal loss) and Dice is taken over the annotated classes only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_ce(logits: torch.Tensor, target: torch.Tensor, labelled: tuple[int, ...] = ()) -> torch.Tensor:
    """logits (b, k, *s), target (b, *s) integer labels -> scalar loss (CE + (1 - soft Dice))."""
    k = logits.shape[1]
    probs = torch.softmax(logits.float(), 1)
    if labelled:
        keep = [0, *labelled]
        others = [c for c in range(1, k) if c not in labelled]
        background = probs[:, :1] + probs[:, others].sum(1, keepdim=True) if others else probs[:, :1]
        probs = torch.cat([background, probs[:, list(labelled)]], 1)
        mapping = torch.zeros(k, dtype=torch.long, device=target.device)
        mapping[torch.tensor(keep, device=target.device)] = torch.arange(len(keep), device=target.device)
        target = mapping[target]
        ce = F.nll_loss(torch.log(probs.clamp_min(1e-8)), target)
    else:
        ce = F.cross_entropy(logits.float(), target)
    onehot = F.one_hot(target, probs.shape[1]).movedim(-1, 1).to(probs)
    axes = tuple(range(2, probs.ndim))
    intersection = (probs * onehot).sum(axes)[:, 1:]
    denominator = (probs.sum(axes) + onehot.sum(axes))[:, 1:]
    dice = (2 * intersection + 1e-5) / (denominator + 1e-5)
    return ce + (1 - dice.mean())


def deep_supervision_loss(outputs: list[torch.Tensor] | torch.Tensor, target: torch.Tensor,
                          labelled: tuple[int, ...] = ()) -> torch.Tensor:
    """Weights 1, 1/2, 1/4, ... normalised, the lowest resolution left out, as nnU-Net does."""
    if isinstance(outputs, torch.Tensor):
        return dice_ce(outputs, target, labelled)
    weights = [1 / 2**i for i in range(len(outputs))]
    weights[-1] = 0.0
    total = sum(weights)
    loss = outputs[0].new_zeros(())
    for output, weight in zip(outputs, weights, strict=True):
        if weight == 0:
            # no contribution, but keep the output in the graph: DDP demands a gradient (even a
            # zero one) for every parameter, including this head's.
            loss = loss + 0.0 * output.float().mean()
            continue
        scaled = target
        if output.shape[2:] != target.shape[1:]:
            scaled = F.interpolate(target[:, None].float(), size=output.shape[2:], mode="nearest")[:, 0].long()
        loss = loss + weight / total * dice_ce(output, scaled, labelled)
    return loss
