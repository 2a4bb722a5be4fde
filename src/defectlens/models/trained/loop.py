"""The training loop shared by trained detectors."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm


def train_steps(loss_of: Callable[[int], torch.Tensor], parameters, steps: int, lr: float, desc: str) -> list[float]:
    """Adam with a cosine learning-rate decay over ``steps``; ``loss_of(step)`` builds the loss.
    Returns the loss of every step."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1), eta_min=lr * 0.05)
    losses = []
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False)
    for step in bar:
        loss = loss_of(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
    return losses
