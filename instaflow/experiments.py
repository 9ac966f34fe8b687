"""Experiments by name: ``embedded/distill_direct`` -> the ``-c`` chain of config files it stands for.

An experiment is one YAML file under ``experiments/`` that overrides what it extends. Its header
comments name what that is and how it runs (comments, because LightningCLI rejects unknown keys):

    # extends: embedded/distill              (experiment or fragment names; several are applied in order)
    # command: predict                       (the LightningCLI subcommand when none is given; default fit)

The chain is ``experiments/base/default.yaml``, then each extended file's own chain, then the file
itself; LightningCLI merges them in that order (mappings key by key, a list replaced whole, a
``key+:`` list appended). This module is the one place that knows the chain: the CLI's
``--experiment`` option, the Makefile (``make run EXP=...``), the sweeps and the tests all use it.
"""

from __future__ import annotations

import copy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
BASE = EXPERIMENTS / "base" / "default.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def experiment_file(name: str | Path) -> Path:
    """``embedded/reflow`` (or ``experiments/embedded/reflow.yaml``, or a path) -> the YAML file."""
    p = Path(name)
    candidates = [p] if p.suffix in (".yaml", ".yml") else [EXPERIMENTS / f"{name}.yaml"]
    if p.suffix in (".yaml", ".yml") and not p.is_absolute():
        candidates.append(ROOT / p)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    known = sorted(str(f.relative_to(EXPERIMENTS).with_suffix("")) for f in EXPERIMENTS.rglob("*.yaml")
                   if f.parent.name not in ("sweeps",))
    raise FileNotFoundError(f"no experiment {str(name)!r} (looked for {', '.join(str(c) for c in candidates)}); "
                            f"known: {', '.join(known)}")


def header(path: Path) -> dict[str, str]:
    """The ``# key: value`` lines at the top of an experiment file (before its first YAML line)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line[1:].strip().partition(":")
        if sep and key.strip() in ("extends", "command"):
            out[key.strip()] = value.strip()
    return out


def chain(name: str | Path) -> list[Path]:
    """The config files of an experiment, base first, each once, in the order LightningCLI applies them."""
    files: list[Path] = [BASE.resolve()]

    def visit(path: Path, stack: tuple[Path, ...]) -> None:
        if path in stack:
            raise ValueError(f"experiments extend each other in a circle: {' -> '.join(map(str, stack + (path,)))}")
        for parent in header(path).get("extends", "").split():
            visit(experiment_file(parent), stack + (path,))
        if path not in files:
            files.append(path)

    visit(experiment_file(name), ())
    return files


def command(name: str | Path) -> str:
    """The experiment's LightningCLI subcommand (its own header, else what it extends says, else fit)."""
    for path in reversed(chain(name)):
        cmd = header(path).get("command")
        if cmd:
            if cmd not in SUBCOMMANDS:
                raise ValueError(f"{path}: '# command: {cmd}' is not one of {SUBCOMMANDS}")
            return cmd
    return "fit"


def config_args(name: str | Path) -> list[str]:
    """``["-c", file, ...]`` for the experiment's chain."""
    return [a for f in chain(name) for a in ("-c", _rel(f))]


def expand(args: list[str], subcommand: bool = True) -> list[str]:
    """CLI arguments with ``--experiment NAME`` (or ``--experiment=NAME``) replaced by its ``-c`` chain;
    without a subcommand the experiment's own is put first (``subcommand=False``: none, for a
    LightningCLI built with ``run=False``). Other arguments are kept, in order."""
    out, name = [], None
    it = iter(args)
    for a in it:
        if a == "--experiment":
            name = next(it, None)
            if name is None:
                raise ValueError("--experiment needs a name, e.g. --experiment embedded/reflow")
        elif a.startswith("--experiment="):
            name = a.split("=", 1)[1]
        else:
            out.append(a)
    if name is None:
        return list(args)
    sub = [out.pop(0)] if out and out[0] in SUBCOMMANDS else [command(name)] if subcommand else []
    return sub + config_args(name) + out


def resolved(name: str | Path) -> dict:
    """The experiment's chain merged into one mapping the way LightningCLI merges config files (for tests
    and tools that read or rewrite an experiment as one file)."""
    import yaml

    cfg: dict = {}
    for f in chain(name):
        cfg = merge(cfg, yaml.safe_load(f.read_text()) or {})
    return cfg


def merge(base: dict, override: dict) -> dict:
    """``override`` on ``base``: mappings merged key by key, lists replaced, ``key+`` lists appended."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if k.endswith("+"):
            key = k[:-1]
            out[key] = list(out.get(key) or []) + (list(v) if isinstance(v, list) else [v])
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
