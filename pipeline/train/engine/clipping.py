"""Gradient clipping as the original tool does it: a warm threshold, then damping of abnormal norms.

Steps ``0 … start``: the threshold falls linearly from ``ratio × max_norm`` to
``max_norm`` (early gradients are large and clipping them hard slows the start).
After ``start``, a norm above 5× the threshold is an outlier: it is clipped to
``threshold / min(norm / threshold, 10)``, so the larger the spike the smaller the
update it makes.  Pure functions of (step, norm): the same on every rank, since
the norm is the global one.
"""

from __future__ import annotations

import math

ABNORMAL_FACTOR = 5.0
MAX_DAMPING = 10.0


def clip_threshold(step: int, max_norm: float, initial_ratio: float, warm_steps: int) -> float:
    """The threshold at optimizer step ``step`` (0-based): linear from ``initial_ratio × max_norm`` to ``max_norm``."""
    if step >= warm_steps or warm_steps <= 0:
        return max_norm
    start = max_norm * initial_ratio
    return start + (max_norm - start) * max(step, 0) / warm_steps


def clip_bound(norm: float, step: int, max_norm: float, initial_ratio: float, abnormal_start: int) -> float:
    """The norm the gradients are clipped to at ``step`` given their global ``norm`` (``inf``: no clipping)."""
    if max_norm <= 0:
        return math.inf
    threshold = clip_threshold(step, max_norm, initial_ratio, abnormal_start)
    ratio = norm / threshold
    if ratio > ABNORMAL_FACTOR and step > abnormal_start:
        return threshold / min(ratio, MAX_DAMPING)
    return threshold
