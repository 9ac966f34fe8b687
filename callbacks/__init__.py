"""Callbacks own evaluation and side effects: EMA, image grids, exports, coupling shards, quality
curves, throughput. They reach a module only through the Protocols of ``instaflow.contracts``
and never import ``lightning_modules``."""
