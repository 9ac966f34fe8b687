"""Studies: experiments whose orchestration and report are their own, not the library's.

A study composes the library (``instaflow``), the stages (``lightning_modules`` through the CLI) and
its experiment files under ``experiments/<study>/``; nothing imports a study (layer 5, beside
``instaflow.tools``). ``studies.ablation``: the embedded ablation (``make ablation``, docs/ablation.md).
"""
