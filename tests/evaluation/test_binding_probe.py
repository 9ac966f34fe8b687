"""The binding probe separates token states that carry binding from a bag of words."""

from __future__ import annotations

import numpy as np
import torch

from instaflow.evaluation.binding_probe import bound_by_objects, cell_targets, train_probe


def _synthetic_states(scenes, bound: bool) -> torch.Tensor:
    """One token per object: one-hot colour + shape, plus one-hot cell when ``bound``; padded to 3 tokens.
    Without the cell the tokens say which attributes occur but not where: a bag of words."""
    from data.shapes import COLORS, SHAPES

    states = torch.zeros(len(scenes), 3, 9 + len(COLORS) + len(SHAPES) + 1)
    for b, s in enumerate(scenes):
        for j, o in enumerate(s.objects):
            if bound:
                states[b, j, o["cell"]] = 1
            states[b, j, 9 + COLORS.index(o["color"])] = 1
            states[b, j, 9 + len(COLORS) + SHAPES.index(o["shape"])] = 1
        states[b, len(s.objects):, -1] = 1  # padding token
    return states


def test_probe_binds_when_states_carry_cells_and_not_from_a_bag_of_words():
    from data.shapes import sample_scene

    scenes = [sample_scene(np.random.default_rng([3, i])) for i in range(1200)]
    train, test = scenes[:1000], scenes[1000:]
    n_obj = np.array([len(s.objects) for s in test])
    (c_tr, s_tr), (c_te, s_te) = cell_targets(train), cell_targets(test)
    assert c_tr.shape == (1000, 9) and int((c_tr > 0).sum()) == sum(len(s.objects) for s in train)

    results = {}
    for bound in (True, False):
        probe = train_probe(_synthetic_states(train, bound), c_tr, s_tr, layers=1, steps=400, batch_size=64, lr=5e-3)
        results[bound] = bound_by_objects(probe, _synthetic_states(test, bound), c_te, s_te, n_obj)
    assert set(results[True]) == {"1", "2", "3"}
    assert results[True]["2"] > 0.9 and results[True]["3"] > 0.8  # the cell is in the token: one hop binds
    assert results[False]["2"] < 0.2  # no cell anywhere: attributes cannot be placed
