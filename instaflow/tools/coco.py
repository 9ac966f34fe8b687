"""COCO text-to-image evaluation of a model folder (FID, CLIP score) under a pinned protocol.

    python -m instaflow.tools.coco --model runs/sd15/models/instaflow --steps 1 --guidance 1 \
        --protocol coco2017_5k --annotations data/coco/annotations/captions_val2017.json \
        --images data/coco/val2017 --out runs/coco/instaflow_1step

The protocol is ``instaflow.evaluation.coco``'s (its docstring states it; ``results.json`` repeats it).
"""

from __future__ import annotations

import argparse
import json

from instaflow.evaluation.coco import DEFAULT_CLIP, PROTOCOLS, evaluate


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="pipeline folder or hub id (teacher, 2-RF or one-step model)")
    p.add_argument("--protocol", default="coco2017_5k", choices=sorted(PROTOCOLS))
    p.add_argument("--annotations", required=True, help="captions_val2017.json or captions_val2014.json")
    p.add_argument("--images", required=True, help="the val2017 or val2014 image folder")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--n", type=int, default=None, help="fewer prompts than the protocol's (for a quick look)")
    p.add_argument("--seed", type=int, default=0, help="sample-rule seed (30k)")
    p.add_argument("--clip-model", default=DEFAULT_CLIP)
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args(argv)
    results = evaluate(a.model, a.out, a.annotations, a.images, a.protocol, a.steps, a.guidance, a.n, a.seed,
                       a.clip_model, batch_size=a.batch_size)
    print(json.dumps({k: v for k, v in results.items() if k != "protocol"}, indent=2))
    return results


if __name__ == "__main__":
    main()
