"""Models: the model families (``families/``, one file each behind ``contracts.Family``), loading and saving
diffusers pipelines, text encoders, UNets (the stacked U-Net too), FSDP2 sharding, the perceptual loss's
networks, ``TextToImage`` (the SD family's name for evaluation and tools), and the pipeline file
that exported folders carry (``rf_pipeline.py``, imports nothing of this project).

Uses ``instaflow.flow``; never the data, evaluation, stages or callbacks.
"""
