"""Can cross-attention bind attributes to objects from a frozen text encoder's token states?

    python -m instaflow.tools.binding_probe --max-length 48 --layers 1 2

A diagnostic for the embedded teacher's design (docs/embedded_teacher.md). For captions of the
shapes world it trains a small probe whose *queries are the 3x3 grid cells* and whose keys and
values are the frozen token states: ``layers`` stacked cross-attention blocks (as a UNet
transformer block at one location stacks them), then a per-cell head predicting the colour and
the shape in that cell (or "empty"). A scene counts as bound when every cell is right.

What it separates: if one layer already binds two-object scenes, the token states carry the
binding and a UNet that fails at it lacks depth or training, not text features; if the caption is
truncated at ``max_length`` the probe cannot recover the cut objects either (count printed).
Text states are computed once; training runs on them (a few minutes on 2 cores).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.shapes import COLORS, GRID, SHAPES


def cell_targets(scenes: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell colour (0 = empty, 1..6) and shape (0 = empty, 1..4) labels, (N, 9) each."""
    color = torch.zeros(len(scenes), GRID * GRID, dtype=torch.long)
    shape = torch.zeros_like(color)
    for b, s in enumerate(scenes):
        for o in s.objects:
            color[b, o["cell"]] = 1 + COLORS.index(o["color"])
            shape[b, o["cell"]] = 1 + SHAPES.index(o["shape"])
    return color, shape


class CellProbe(nn.Module):
    """Learned cell queries -> ``layers`` x (pre-norm cross-attention over token states) -> colour/shape logits."""

    def __init__(self, text_dim: int, layers: int, dim: int = 64, heads: int = 8, cells: int = 9,
                 colors: int = 7, shapes: int = 5) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(cells, dim) * 0.5)
        self.attn = nn.ModuleList(nn.MultiheadAttention(dim, heads, kdim=text_dim, vdim=text_dim, batch_first=True)
                                  for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.head = nn.Sequential(nn.Linear(dim, 128), nn.GELU(), nn.Linear(128, colors + shapes))
        self.colors = colors

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.queries.expand(states.shape[0], -1, -1)  # (B, 9, dim)
        for attn, norm in zip(self.attn, self.norms):
            x = x + attn(norm(x), states, states, need_weights=False)[0]
        out = self.head(x)  # (B, 9, colors + shapes)
        return out[..., :self.colors], out[..., self.colors:]


def train_probe(states: torch.Tensor, color: torch.Tensor, shape: torch.Tensor, layers: int, steps: int = 3000,
                batch_size: int = 128, lr: float = 2e-3, seed: int = 0) -> CellProbe:
    torch.manual_seed(seed)
    probe = CellProbe(states.shape[-1], layers)
    opt = torch.optim.Adam(probe.parameters(), lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(states), (batch_size,), generator=g)
        c, s = probe(states[idx])
        loss = F.cross_entropy(c.flatten(0, 1), color[idx].flatten()) + F.cross_entropy(s.flatten(0, 1), shape[idx].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return probe.eval()


@torch.no_grad()
def bound_by_objects(probe: CellProbe, states: torch.Tensor, color: torch.Tensor, shape: torch.Tensor,
                     n_objects: np.ndarray) -> dict[str, float]:
    """Share of scenes with every cell's colour and shape right, per number of objects."""
    c, s = probe(states)
    ok = ((c.argmax(-1) == color) & (s.argmax(-1) == shape)).all(1).numpy()
    return {str(k): round(float(ok[n_objects == k].mean()), 3) for k in sorted(set(n_objects.tolist()))}
