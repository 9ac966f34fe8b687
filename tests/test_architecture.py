"""The import direction of docs/architecture.md, checked on every import of the project's code
(module level and inside functions): a lower layer never imports a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("instaflow", "lightning_modules", "data", "callbacks", "benchmarks", "studies")

# layer 0 modules with no project imports of their own, which every layer may use
BASE = ("instaflow.state", "instaflow.collective")

# What each package may import of the project (prefixes; itself always allowed). Most specific first.
ALLOWED: dict[str, tuple[str, ...]] = {
    # copied into exported model folders: they must load without this project
    "instaflow.models.rf_pipeline": (),
    "instaflow.models.stacked_unet": (),
    "instaflow.contracts": (),
    "instaflow.experiments": (),
    # state on disk (atomic writes, tolerant reads) and rank-0 work whose errors reach every rank: any layer uses them
    "instaflow.state": (),
    "instaflow.collective": (),
    "instaflow.flow": ("instaflow.flow", *BASE),
    # the resume protocol (marks, finding, safe reading, refusals): below every layer that writes or reads a checkpoint
    "instaflow.resume": ("instaflow.resume", *BASE),
    "data": ("data", "instaflow.flow", *BASE),
    "instaflow.models": ("instaflow.models", "instaflow.flow", "instaflow.resume", "instaflow.contracts", *BASE),
    # loss objects: LPIPS builds a feature network and decodes with the model's VAE (beside evaluation, layer 3)
    "instaflow.losses": ("instaflow.losses", "instaflow.models", "instaflow.flow", "instaflow.contracts", *BASE),
    "instaflow.evaluation": ("instaflow.evaluation", "instaflow.models", "instaflow.flow", "instaflow.resume",
                             "instaflow.contracts", "data", *BASE),
    # the entry point: LightningCLI assembles modules and callbacks (it adds callbacks.resume.Resume to every run)
    "lightning_modules.cli": ("lightning_modules", "callbacks", "instaflow.flow", "instaflow.models", "instaflow.losses",
                              "instaflow.resume", "instaflow.evaluation", "instaflow.contracts", "instaflow.experiments",
                              "data", *BASE),
    "lightning_modules": ("lightning_modules", "instaflow.flow", "instaflow.models", "instaflow.losses",
                          "instaflow.resume", "instaflow.evaluation", "instaflow.contracts", "instaflow.experiments",
                          "data", *BASE),
    "callbacks": ("callbacks", "instaflow.flow", "instaflow.models", "instaflow.resume", "instaflow.evaluation",
                  "instaflow.contracts", "data", *BASE),
    "instaflow.tools": ("instaflow", "lightning_modules", "data", "callbacks"),
    "benchmarks": ("benchmarks", "instaflow", "lightning_modules", "data", "callbacks"),
    # a study's own orchestration and report (make ablation): layer 5, nothing imports it
    "studies": ("studies", "instaflow", "lightning_modules", "data", "callbacks"),
    "instaflow": ("instaflow",),  # the package's own __init__
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(source: str, module: str) -> list[tuple[int, str]]:
    """(line, imported module) of every import of a project package in ``source``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = module.split(".")[: -node.level] if not module.endswith("__init__") else module.split(".")
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
            names = [f"{names[0]}.{a.name}" if not node.module or a.name[0].islower() else names[0] for a in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split(".")[0] in PACKAGES]
    return found


def rule_for(module: str) -> tuple[str, tuple[str, ...]]:
    for prefix in ALLOWED:  # insertion order: most specific first
        if module == prefix or module.startswith(prefix + "."):
            return prefix, ALLOWED[prefix]
    raise KeyError(f"{module} belongs to no layer of docs/architecture.md: add it to ALLOWED and to the doc")


def violations(source: str, module: str) -> list[str]:
    layer, allowed = rule_for(module)
    out = []
    for line, name in project_imports(source, module):
        own = name == layer or name.startswith(layer + ".")
        if not own and not any(name == a or name.startswith(a + ".") for a in allowed):
            out.append(f"{module}:{line} imports {name} (layer {layer} may import only {', '.join(allowed) or 'nothing of the project'})")
    return out


def project_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_import_runs_in_the_allowed_direction():
    bad = [v for p in project_files() for v in violations(p.read_text(), module_name(p))]
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


@pytest.mark.parametrize("module, source, n_bad", [
    ("data.pairs", "def f():\n    from lightning_modules.student import FlowStudent\n", 1),  # hidden in a function
    ("data.pairs", "from instaflow.models import loading\n", 1),
    ("instaflow.flow.noise", "import instaflow.models.loading\n", 1),
    ("instaflow.models.sampler", "from instaflow.evaluation import fid\n", 1),
    ("callbacks.export", "from lightning_modules import student\n", 1),
    ("instaflow.models.rf_pipeline", "from instaflow.flow import diffusion\n", 1),
    ("lightning_modules.reflow", "from instaflow.flow.paths import interpolate\nfrom data.pairs import x\n", 0),
    ("instaflow.tools.evaluate", "from lightning_modules.cli import main\nfrom callbacks.ema import EMA\n", 0),
], ids=["data-imports-stage-inside-a-function", "data-imports-models", "flow-imports-models", "models-import-evaluation",
        "callback-imports-stage", "exported-file-imports-project", "stage-imports-flow-and-data", "tool-imports-anything"])
def test_the_check_catches_imports_against_the_direction(module, source, n_bad):
    assert len(violations(source, module)) == n_bad


def test_every_module_belongs_to_a_layer_and_the_doc_names_each_layer():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for p in project_files():
        layer, _ = rule_for(module_name(p))
        assert f"`{layer}" in doc or layer == "instaflow", f"docs/architecture.md does not describe layer {layer}"
