"""FAPrompt's training losses: L = L_local + L_global + L_prior + 0.1 * L_oc.

The 0.1 on the orthogonality loss is the authors' code's weight (the paper writes an
unweighted sum). L_global is the paper's focal loss on the fused score s(x) or, as in the
authors' code, the cross-entropy of the image-level abnormality probability s_a(x). Targets may be soft: masks are shrunk to the training resolution by area, so
a defect smaller than a pixel there still counts as its fraction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GAMMA = 2.0  # focal exponent, as in the focal loss paper and the authors' code
EPS = 1e-6


def focal(probability: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Two-class focal loss on anomaly probabilities (normal = 1 - p) with soft targets: small,
    rare defective regions are not drowned by the easy normal pixels."""
    p = probability.clamp(EPS, 1 - EPS)
    loss = target * (1 - p) ** GAMMA * -p.log() + (1 - target) * p ** GAMMA * -(1 - p).log()
    return loss.mean()


def cross_entropy(probability: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of anomaly probabilities against 0/1 (or soft) targets."""
    return F.binary_cross_entropy(probability.clamp(EPS, 1 - EPS), target)


def dice(probability: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice per image (N, ...), averaged; the +1 keeps empty masks finite."""
    p, t = probability.flatten(1), target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


def local(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Focal on [M^n, M^a] plus Dice of M^a with G and of M^n with 1 - G."""
    return focal(maps, masks) + dice(maps, masks) + dice(1 - maps, 1 - masks)


def orthogonality(abnormal: torch.Tensor) -> torch.Tensor:
    """Sum over pairs i < j of |cos(f_t(P^{a_i}), f_t(P^{a_j}))|: keeps the K abnormal prompts apart."""
    unit = F.normalize(abnormal, dim=-1)
    cosines = unit @ unit.T
    return cosines.triu(1).abs().sum()


def prior(omega: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Squared prior on normal images: a normal image has no abnormal patches to add."""
    return (omega[labels == 0] ** 2).mean(dim=1).sum()
