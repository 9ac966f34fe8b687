"""Reflow step time with the couplings' stored text states vs re-encoding every caption.

    python -m benchmarks.bench_stored_states

The embedded teacher (assets/embedded-sd), batch 64, text cache off and fresh captions every step
(as on LAION, where captions do not repeat), caption dropout 0.1; ReflowTraining.loss + backward +
AdamW step; median of 6 steps after 2 of warm-up, two interleaved rounds.
"""
import time, statistics, torch
from lightning_modules.reflow import ReflowTraining
from instaflow.flow.noise import latent_shape
m = ReflowTraining("assets/embedded-sd", parameterization="velocity_wrapper", text_cache_size=0, caption_dropout=0.1)
m.configure_model()
opt = torch.optim.AdamW(m.unet.parameters(), lr=1e-5)
g = torch.Generator().manual_seed(0)
B = 64
caps = [f"a large red circle in the center on a white background number {i}" for i in range(10000)]
def batch(i, stored):
    c = caps[i * B:(i + 1) * B]
    b = {"x0": torch.randn(B, *latent_shape(m.unet.config), generator=g), "x1": torch.randn(B, *latent_shape(m.unet.config), generator=g), "caption": c}
    if stored:
        with torch.no_grad():
            b["text_states"] = m.text_encoder(c).half()
    return b
res = {}
for rnd in range(2):
    for stored in (False, True):
        ts = []
        for i in range(8):
            b = batch(rnd * 40 + i + (20 if stored else 0), stored)
            t0 = time.perf_counter()
            loss = m.loss(b, g, 0.1); loss.backward(); opt.step(); opt.zero_grad()
            ts.append(time.perf_counter() - t0)
        res.setdefault(stored, []).append(statistics.median(ts[2:]))
enc = []
for i in range(6):
    t0 = time.perf_counter(); 
    with torch.no_grad(): m.text_encoder(caps[i*B:(i+1)*B])
    enc.append(time.perf_counter() - t0)
print("re-encode ms/step:", [round(1000*x) for x in res[False]], "stored ms/step:", [round(1000*x) for x in res[True]], "encode alone ms:", round(1000*statistics.median(enc)))
