"""Straightness of a solver's path (Liu et al. 2022, Rectified Flow, eq. 6), from its states.

A path is ``[(t, x_t), ...]`` in flow time, x0 first (``solvers`` record it). Velocities are
its finite differences: for Euler, exactly the velocities it used.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def path_velocities(path: list) -> list[tuple[float, float, Tensor]]:
    """(t, dt, v) of each step of a path of states, v = (x_{t+dt} - x_t) / dt (steps with dt > 0)."""
    return [(t0, t1 - t0, (xb - xa) / (t1 - t0)) for (t0, xa), (t1, xb) in zip(path[:-1], path[1:]) if t1 > t0]


def straightness(path: list, skip_first: bool = False) -> Tensor:
    """S = sum_i dt_i E||(x1 - x0) - v_i||^2, the integral of Liu et al. 2022 (eq. 6), per sample.

    The squared norm is averaged over elements, so S does not grow with resolution; 0 for straight
    paths. ``skip_first`` leaves the first step out of the sum (x0 and x1 stay the path's ends).
    """
    x0, x1 = path[0][1], path[-1][1]
    segs = path_velocities(path)[1 if skip_first else 0:]
    direction = (x1 - x0).flatten(1)
    total = sum(dt * (direction - v.flatten(1)).pow(2).mean(1) for _, dt, v in segs)
    return total / sum(dt for _, dt, _ in segs)


def path_length_ratio(path: list) -> Tensor:
    """Length of the path over the chord ||x1 - x0||; 1.0 for a straight path, per sample."""
    x0, x1 = path[0][1], path[-1][1]
    length = sum(abs(dt) * v.flatten(1).norm(dim=1) for _, dt, v in path_velocities(path))
    return length / (x1 - x0).flatten(1).norm(dim=1).clamp_min(1e-12)
