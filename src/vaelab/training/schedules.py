"""Learning-rate schedules: the learning rate as a pure function of the training position (epochs,
fractional within an epoch), so that a resumed run follows the same schedule step for step with
nothing to save beyond its config (``train.schedule`` and its settings live in every checkpoint).

* ``constant``: ``train.lr`` throughout.
* ``burda``: Burda et al. (2016, Sec. 5): 3^i passes at ``lr`` * 10^(-i/7) for i = 0..7 (3,280 passes
  in all; with ``lr`` = 1e-3 and Adam's epsilon 1e-4 as in the paper); a shorter run follows the
  first stages, a longer one stays at the last rate.
* ``cosine``: from ``lr`` down to ``lr_min`` along half a cosine over ``train.epochs`` (updated every step).
* ``step``: ``lr`` multiplied by ``step_gamma`` every ``step_epochs`` epochs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..config import TrainConfig
from ..registry import Registry

Schedule = Callable[[TrainConfig, float], float]  # (train config, epochs done, fractional) -> lr

SCHEDULES: Registry[Schedule] = Registry("learning-rate schedule")

BURDA_STAGES = 8  # i = 0..7


@SCHEDULES.register("constant")
def constant(t: TrainConfig, epoch: float) -> float:
    return t.lr


@SCHEDULES.register("burda")
def burda(t: TrainConfig, epoch: float) -> float:
    """Stage i covers epochs [sum_{j<i} 3^j, sum_{j<=i} 3^j) = [(3^i - 1)/2, (3^(i+1) - 1)/2)."""
    i, end = 0, 1
    while epoch >= end and i < BURDA_STAGES - 1:
        i += 1
        end += 3**i
    return t.lr * 10.0 ** (-i / 7.0)


@SCHEDULES.register("cosine")
def cosine(t: TrainConfig, epoch: float) -> float:
    frac = min(1.0, epoch / t.epochs) if t.epochs else 1.0
    return t.lr_min + (t.lr - t.lr_min) * 0.5 * (1.0 + math.cos(math.pi * frac))


@SCHEDULES.register("step")
def step(t: TrainConfig, epoch: float) -> float:
    return t.lr * t.step_gamma ** math.floor(epoch / t.step_epochs)


def lr_at(t: TrainConfig, epoch: float) -> float:
    """The learning rate at ``epoch`` (epochs done, fractional within an epoch)."""
    return SCHEDULES.get(t.schedule)(t, epoch)
