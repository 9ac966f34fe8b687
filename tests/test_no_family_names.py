"""The stages and callbacks never name a model family (issue 25): they hold one ``instaflow.contracts.Family``.

Every ``.py`` file under ``lightning_modules/`` and ``callbacks/`` is parsed with ``ast`` (not grepped) and
refused if it spells a family: a string constant equal to a family's name, title or pipeline class, a
family class name (as a name, an attribute or an import), or a dict / match keyed by them. The forbidden
words come from the family registry, so a new family file is covered without touching this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGE_DIRS = ("lightning_modules", "callbacks")


def family_words() -> set[str]:
    from instaflow.models.families import forbidden_names

    return forbidden_names()


def _strings(node: ast.AST) -> list[tuple[int, str]]:
    """(line, value) of every string constant under ``node``."""
    return [(n.lineno, n.value) for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def violations(source: str, words: set[str], filename: str = "<source>") -> list[str]:
    """Where ``source`` names a family: string constants, names, attributes, imports, dict keys, match cases."""
    tree = ast.parse(source, filename)
    found = []
    lowered = {w.lower() for w in words}
    classes = {w for w in words if w[0].isupper()}  # identifiers: class names (a variable ``sd`` is a state dict)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in words or node.value.lower() in lowered:
                found.append(f"{where}: string {node.value!r}")
        elif isinstance(node, ast.Name) and node.id in classes:
            found.append(f"{where}: name {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr in classes:
            found.append(f"{where}: attribute .{node.attr}")
        elif isinstance(node, ast.alias) and (node.name.split(".")[-1] in classes or node.asname in classes):
            found.append(f"{where}: import {node.name}")
        elif isinstance(node, ast.Dict):
            keys = [k for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
            for k in keys:
                if k.value in words or k.value.lower() in lowered:
                    found.append(f"{where}: dict keyed by {k.value!r}")
        elif isinstance(node, ast.match_case):
            for line, value in _strings(node.pattern):
                if value in words or value.lower() in lowered:
                    found.append(f"{filename}:{line}: match case {value!r}")
    return sorted(set(found))


def stage_files() -> list[Path]:
    return sorted(p for d in STAGE_DIRS for p in (ROOT / d).rglob("*.py"))


def test_the_forbidden_words_come_from_the_registry():
    words = family_words()
    assert {"sd", "sdxl", "sd3", "flux", "StableDiffusionXLPipeline", "FluxPipeline", "SDXLFamily",
            "SD3Family", "FluxFamily", "SDFamily", "TextToImage"} <= words
    assert len(stage_files()) > 10


@pytest.mark.parametrize("path", stage_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_stage_or_callback_names_a_family(path):
    found = violations(path.read_text(), family_words(), str(path.relative_to(ROOT)))
    assert not found, "hold the family object instead (instaflow.contracts.Family):\n" + "\n".join(found)


@pytest.mark.parametrize("source,what", [
    ('if self.family == "sdxl":\n    pass\n', "string 'sdxl'"),
    ('kind = "flow_matching" if fam in ("sd3", "flux") else "flow"\n', "string 'sd3'"),
    ("from instaflow.models.families.sdxl import SDXLFamily\n", "import SDXLFamily"),
    ("model = families.FluxFamily.from_pretrained(x)\n", "attribute .FluxFamily"),
    ("ok = isinstance(m, SD3Family)\n", "name SD3Family"),
    ('SOLVERS = {"StableDiffusionXLPipeline": 1}\n', "dict keyed by 'StableDiffusionXLPipeline'"),
    ('match name:\n    case "flux":\n        pass\n', "match case 'flux'"),
])
def test_the_checker_catches_a_planted_family_name(source, what):
    found = violations(source, family_words())
    assert any(what in f for f in found), found


def test_the_checker_lets_family_free_code_pass():
    source = ('"""Works for SD3 and SDXL folders alike (words in a docstring are not a switch)."""\n'
              "x1 = self.family.solve(x0, cond, uncond, steps, w)\nmeta = {'family': self.family.name}\n")
    assert violations(source, family_words()) == []
