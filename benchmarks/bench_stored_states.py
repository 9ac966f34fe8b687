"""Reflow step time with the couplings' stored text states vs re-encoding every caption.

    python -m benchmarks.bench_stored_states

The embedded teacher (assets/embedded-sd), batch 64, text cache off and fresh captions every step
(as on LAION, where captions do not repeat), caption dropout 0.1; ReflowTraining.loss + backward +
AdamW step; median of 6 steps after 2 of warm-up, two interleaved rounds.
"""

from __future__ import annotations

import statistics
import time

import torch

BATCH = 64


def main() -> dict:
    from instaflow.flow.noise import latent_shape
    from lightning_modules.reflow import ReflowTraining

    model = ReflowTraining("assets/embedded-sd", parameterization="velocity_wrapper", text_cache_mb=0,
                           caption_dropout=0.1)
    model.configure_model()
    opt = torch.optim.AdamW(model.unet.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    captions = [f"a large red circle in the center on a white background number {i}" for i in range(10_000)]
    shape = (BATCH, *latent_shape(model.unet.config))  # (B, 4, 8, 8)

    def batch(i: int, stored: bool) -> dict:
        chunk = captions[i * BATCH:(i + 1) * BATCH]  # fresh captions: nothing cached
        b = {"x0": torch.randn(shape, generator=g), "x1": torch.randn(shape, generator=g), "caption": chunk}
        if stored:  # as the coupling stage stores them (float16)
            with torch.no_grad():
                b["text_states"] = model.text_encoder(chunk).half()
        return b

    step_s: dict[bool, list[float]] = {False: [], True: []}
    for rnd in range(2):
        for stored in (False, True):
            times = []
            for i in range(8):
                b = batch(rnd * 40 + i + (20 if stored else 0), stored)
                t0 = time.perf_counter()
                model.loss(b, g, 0.1).backward()
                opt.step()
                opt.zero_grad()
                times.append(time.perf_counter() - t0)
            step_s[stored].append(statistics.median(times[2:]))
    encode = []
    for i in range(6):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.text_encoder(captions[i * BATCH:(i + 1) * BATCH])
        encode.append(time.perf_counter() - t0)
    out = {"reencode_ms": [round(1000 * s) for s in step_s[False]], "stored_ms": [round(1000 * s) for s in step_s[True]],
           "encode_alone_ms": round(1000 * statistics.median(encode)), "batch": BATCH}
    print(out)
    return out


if __name__ == "__main__":
    main()
