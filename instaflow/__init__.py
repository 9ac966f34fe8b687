"""The InstaFlow library: everything the LightningModules, callbacks and tools are built from.

Subpackages, lowest first (docs/architecture.md has the picture and the import rules):

- ``flow``: pure flow math (paths, time samplers, solvers, guidance, diffusion <-> flow
  conversions, velocity wrappers, seeded noise, losses, straightness, optimiser schedules);
- ``models``: loading and saving diffusers models, text encoders, the stacked U-Net, FSDP2
  sharding, the ``TextToImage`` sampler, the exported pipeline file;
- ``evaluation``: FID, the scoring protocol, the embedded evaluator, the results table, COCO;
- ``tools``: thin command-line mains (``python -m instaflow.tools.<name>``);
- ``contracts``: what callbacks need from a LightningModule, as ``typing.Protocol``s.

Nothing here runs at import: weights load when a caller asks for them.
"""
