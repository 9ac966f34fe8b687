"""Data: LAION-layout WebDataset streams, coupling shards, the embedded shapes world, shard writing.

Uses ``instaflow.flow`` (seeded noise) and nothing else of the project: never models, stages or callbacks."""
