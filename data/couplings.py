"""The coupling format, in one place: what a coupling shard holds, its completion mark, the generation record.

A coupling folder (``CouplingWriter``'s output, ``CouplingStream``'s input) holds:

- ``NAME.tar``: one sample per key, members (suffixes ``CAPTION`` ... ``STATES``)
  ``{key}.txt`` the caption (UTF-8; "" is an unconditional coupling),
  ``{key}.json`` ``{"key", "seed", "caption", "source"}`` (x0 is ``noise.seeded_noise([seed], shape)``),
  ``{key}.x1.npy`` the teacher's latent (float16 by default, or float32), (4, h, w),
  ``{key}.x0.npy`` the noise as float32, when stored, (4, h, w),
  ``{key}.states.npy`` the text states as float16, when stored, (L, D);
  samples in key order, tar bytes reproducible (``data.shards.write_tar``: mtime 0).
- ``NAME_stats.json``: the shard's *completion mark*, written atomically after the shard; the shard
  is complete only when both exist and the mark is readable with an integer ``count`` (a kill can
  leave a shard without a mark, never a mark that reads as complete for a cut shard). The embedded
  world's LAION-layout shards (``data.shapes``) use the same mark.
- ``generation.json``: the generation record (what made the couplings: teacher, steps, guidance, seeds).
- ``manifest_rank{r}.json``: the shards and keys rank r wrote in its last run.

Members are read without unpickling: ``.npy`` with ``allow_pickle=False``, ``.json`` through
``data.meta.parse_meta`` (bounded in size and depth).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
import torch

from data.meta import parse_meta
from data.shards import npy_bytes, write_tar
from instaflow.flow.noise import seeded_noise
from instaflow.state import atomic_write_json, read_json

# member suffixes of a sample ``{key}.<suffix>`` and the dtypes on disk
CAPTION, META, X1, X0, STATES = "txt", "json", "x1.npy", "x0.npy", "states.npy"
LATENT_DTYPES = ("float16", "float32")  # x1: the writer's ``latent_dtype`` (numpy has no bfloat16)
X0_DTYPE, STATES_DTYPE = "float32", "float16"
GENERATION_RECORD = "generation.json"


# -- one sample ------------------------------------------------------------------------------------
def check_latent_dtype(latent_dtype: str, key: str = "latent_dtype") -> str:
    """``latent_dtype`` unchanged, or a ValueError naming ``key`` unless it is one of ``LATENT_DTYPES``."""
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"{key} must be one of {LATENT_DTYPES} (numpy has no bfloat16), got {latent_dtype!r}")
    return latent_dtype


def encode_coupling(sample: dict, source: str, latent_dtype: str = "float16") -> list[tuple[str, bytes]]:
    """A coupling ``{key, seed, caption, x1, x0?, text_states?}`` as its shard members, in the format's order."""
    check_latent_dtype(latent_dtype)
    key = sample["key"]
    members = [(f"{key}.{CAPTION}", sample["caption"].encode("utf-8")),
               (f"{key}.{META}", json.dumps({"key": key, "seed": int(sample["seed"]), "caption": sample["caption"],
                                             "source": source}).encode()),
               (f"{key}.{X1}", npy_bytes(sample["x1"], latent_dtype))]
    if "x0" in sample:
        members.append((f"{key}.{X0}", npy_bytes(sample["x0"], X0_DTYPE)))
    if "text_states" in sample:
        members.append((f"{key}.{STATES}", npy_bytes(sample["text_states"], STATES_DTYPE)))
    return members


def read_npy(data: bytes) -> torch.Tensor:
    """A ``.npy`` member as float32; a pickled (object) array is refused, never unpickled."""
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))


class Skip(NamedTuple):
    """Why a raw sample is no coupling: a counted skip reason and a detail for the log."""

    reason: str
    detail: str


def decode_coupling(raw: dict) -> dict | Skip:
    """A WebDataset sample's members as ``{key, caption, x0, x1, seed, text_states?}`` (float32), or a ``Skip``.

    x0 is regenerated from the stored seed (the writer's CPU-generator rule) unless the shard stores it.
    """
    key = raw.get("__key__")
    if X1 not in raw:
        return Skip("missing_x1", key)
    try:
        caption = raw[CAPTION].decode("utf-8").strip() if CAPTION in raw else None
    except UnicodeDecodeError:
        return Skip("bad_caption_encoding", key)
    if caption is None:
        return Skip("missing_caption", key)  # "" is valid here: an unconditional coupling
    meta, why = parse_meta(raw[META]) if META in raw else ({}, "")
    if why:
        return Skip("bad_coupling", f"{key}: .json {why}")
    try:
        x1 = read_npy(raw[X1])  # (4, h, w)
        x0 = read_npy(raw[X0]) if X0 in raw else seeded_noise([meta["seed"]], tuple(x1.shape))[0]
        states = read_npy(raw[STATES]) if STATES in raw else None
    except Exception as exn:  # corrupt or pickled npy, or no seed and no x0
        return Skip("bad_coupling", f"{key}: {exn!r}"[:300])
    if not (torch.isfinite(x1).all() and torch.isfinite(x0).all()):
        return Skip("non_finite_latent", key)
    sample = {"key": key, "caption": caption, "x0": x0, "x1": x1, "seed": meta.get("seed", -1)}
    if states is not None:
        sample["text_states"] = states
    return sample


# -- one shard -------------------------------------------------------------------------------------
def write_coupling_shard(path: str | Path, samples: Iterable[dict], source: str,
                         latent_dtype: str = "float16") -> list[str]:
    """Write couplings as one shard (key order, atomically: ``write_tar``); returns the sorted keys."""
    ordered = sorted(samples, key=lambda s: s["key"])
    write_tar(path, (m for s in ordered for m in encode_coupling(s, source, latent_dtype)))
    return [s["key"] for s in ordered]


def mark_path(shard: str | Path) -> Path:
    """The completion mark of ``NAME.tar``: ``NAME_stats.json`` beside it."""
    shard = Path(shard)
    return shard.with_name(f"{shard.stem}_stats.json")


def write_mark(shard: str | Path, stats: dict, indent: int | None = None, mark: str | Path | None = None) -> Path:
    """Mark a written shard complete: ``stats`` (with an integer ``count``) written atomically, after the shard.

    ``mark``: the mark's path when it is not ``mark_path(shard)`` (the shapes world names it by shard number).
    """
    if not isinstance(stats.get("count"), int):
        raise ValueError(f"a completion mark needs an integer 'count' (the shard's samples), got {stats.get('count')!r}")
    return atomic_write_json(mark or mark_path(shard), stats, indent=indent)


def read_mark(shard: str | Path, mark: str | Path | None = None) -> dict | None:
    """A shard's completion mark, or None when it is absent, cut by a kill, or has no integer ``count``."""
    stats = read_json(mark or mark_path(shard))
    return stats if isinstance(stats, dict) and isinstance(stats.get("count"), int) else None


def is_complete(shard: str | Path, mark: str | Path | None = None) -> bool:
    """Whether a shard and a readable completion mark both exist (a cut mark, or a lost shard, means redo)."""
    return Path(shard).is_file() and read_mark(shard, mark) is not None


def coupling_stats(keys: list[str], source: str, written_at: float, rank: int, world_size: int) -> dict:
    """The coupling writer's completion mark: count, source shard, time, writing rank, keys."""
    return {"count": len(keys), "source": source, "written_at": written_at, "rank": rank, "world_size": world_size,
            "keys": keys}


# -- one folder ------------------------------------------------------------------------------------
def write_generation_record(folder: str | Path, record: dict) -> Path:
    """``generation.json``: what made the couplings of ``folder`` (the stage's ``metadata()``), atomically."""
    return atomic_write_json(Path(folder) / GENERATION_RECORD, record)


def read_generation_record(folder: str | Path) -> dict:
    """``folder``'s generation record; a FileNotFoundError/ValueError that says what to do when absent or cut."""
    path = Path(folder) / GENERATION_RECORD
    if not path.is_file():
        raise FileNotFoundError(f"no {GENERATION_RECORD} in {folder}: not a coupling folder, or its generation "
                                "never started (run the coupling stage, e.g. make gen-pairs)")
    record = read_json(path)
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a JSON object (cut by a kill?): rerun the coupling stage to rewrite it")
    return record


def manifest_path(folder: str | Path, rank: int) -> Path:
    """``manifest_rank{r}.json``: the shards and keys rank r wrote in its last run."""
    return Path(folder) / f"manifest_rank{rank}.json"


def write_manifest(folder: str | Path, rank: int, world_size: int, shards: dict[str, list[str]],
                   skipped_complete: int) -> Path:
    """Rank ``rank``'s manifest: {rank, world_size, shards: name -> keys, count, skipped_complete}, atomically."""
    manifest = {"rank": rank, "world_size": world_size, "shards": shards,
                "count": sum(len(k) for k in shards.values()), "skipped_complete": skipped_complete}
    return atomic_write_json(manifest_path(folder, rank), manifest, indent=1)
