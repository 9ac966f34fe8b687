"""The end of a resampled stream that can never yield: an error that says why, instead of a silent spin.

A training stream resamples its shards forever. When no shard holds a usable sample (0-byte or
cut shards, blank captions, filters that drop everything), it would read and skip without end.
``DryGuard`` watches what was skipped since the last usable sample and raises ``EmptyStreamError``
once every shard has been read through without one, or ``max(MAX_DRY_SKIPS, 2 x shards)`` samples
were skipped in a row. A stream that yields rarely (1 sample in 500) is never stopped: any usable
sample starts the count again.

Each DataLoader worker and each rank resamples the same shard list, so each one raises the error
itself; PyTorch's DataLoader re-raises a worker's error in the main process.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

MAX_DRY_SKIPS = 100_000  # skipped in a row: a bound that ends the search in huge shard lists too

HINTS = (  # (reason prefix, what is wrong and what to do), the first that matches the top reason is given
    ("missing_shard", "the shards could not be opened (no such file): check the path or brace pattern"),
    ("unreadable_shard", "the shards could not be opened: check the path or brace pattern"),
    ("unreadable_tar", "the shards are not readable tar files (empty or cut off): rewrite or replace them"),
    ("filtered_", "the caption filters drop every sample: relax data.init_args.filters"),
    ("", "no sample has what the stream needs (a caption, an image, metadata, latents): fix the shards"),
)


class EmptyStreamError(RuntimeError):
    """A resampled stream whose shards yield no usable sample (it would otherwise spin forever)."""


def describe_shards(spec: str | list[str]) -> str:
    """A shard spec for a message: a pattern as given, a long list shortened."""
    if isinstance(spec, str):
        return repr(spec)
    spec = list(spec)
    return repr(spec) if len(spec) <= 3 else f"[{spec[0]!r}, ... {len(spec)} shards]"


@dataclass
class DryGuard:
    """What a resampled stream skipped since its last usable sample; ``check`` raises when that cannot end."""

    spec: str | list[str]
    urls: list[str]
    reasons: Counter = field(default_factory=Counter)  # skip reasons since the last usable sample
    dry_shards: set = field(default_factory=set)       # shards read through since the last usable sample
    in_shard: bool = False                             # the shard being read gave a usable sample

    def usable(self) -> None:
        """A usable sample: the stream is not dry."""
        self.reasons.clear()
        self.dry_shards.clear()
        self.in_shard = True

    def skipped(self, reason: str) -> None:
        self.reasons[reason] += 1

    def shard_start(self) -> None:
        self.in_shard = False

    def shard_end(self, url: str) -> None:
        """A shard read through (or failed to open): dry unless it gave a usable sample."""
        if not self.in_shard:
            self.dry_shards.add(url)

    def limit(self) -> int:
        return max(MAX_DRY_SKIPS, 2 * len(self.urls))

    def check(self) -> None:
        """Raise ``EmptyStreamError`` when every shard was read through dry, or too many samples skipped in a row."""
        if len(self.dry_shards) >= len(set(self.urls)) or self.reasons.total() >= self.limit():
            raise EmptyStreamError(self.message())

    def message(self) -> str:
        top = self.reasons.most_common(3)
        first = top[0][0] if top else ""
        hint = next(h for prefix, h in HINTS if first.startswith(prefix))
        return (
            f"the resampled (training) stream over {describe_shards(self.spec)} yields no usable sample: "
            f"{self.reasons.total()} samples skipped in a row and {len(self.dry_shards)} of its "
            f"{len(set(self.urls))} shards read through without one (top reasons: "
            f"{', '.join(f'{r} {n}' for r, n in top) or 'none'}). It would read and skip forever; {hint}. "
            "Every DataLoader worker and every rank reads this same shard list, so each stops with this error."
        )
