"""Data: LAION-layout WebDataset streams (``laion``), image decoding (``images``), metadata and caption
filters (``meta``), the end of a stream that can never yield (``stream_guard``), coupling shards (``pairs``),
the embedded shapes world (``shapes``), shard writing (``shards``).

Uses ``instaflow.flow`` (seeded noise) and the layer-0 ``instaflow.state`` (atomic writes), nothing else of
the project: never models, stages or callbacks."""
