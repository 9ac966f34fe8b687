"""The embedded ablation (``make ablation``, docs/ablation.md): ``run`` (the resumable stages, its command line)
and ``report`` (its rows, claims and record: results/ablation.{md,json}).

What is generic lives in the library: paired bootstrap intervals and verdicts (``instaflow.evaluation.paired``),
the scoring of a row (``instaflow.evaluation.protocol.score_images_per_image``), the figures
(``instaflow.evaluation.figures``), latency (``instaflow.evaluation.results``).
"""
