"""Model families, one file each (``base.FamilyBase``, the ``instaflow.contracts.Family`` contract).

``load_family(folder)`` picks the family whose ``pipeline_class`` the folder's ``model_index.json`` names
(``_class_name``); a folder without one, or naming another pipeline, is SD 1.x/2.x (``sd.SDFamily``, the
embedded world included). The registry is every ``FamilyBase`` subclass defined in this package's modules,
found when first asked: adding a family is adding its file (docs/families.md).
"""

from __future__ import annotations

import functools
import importlib
import json
import pkgutil
from pathlib import Path

from instaflow.models import loading
from instaflow.models.families.base import FamilyBase, check_solver, solvers_of

DEFAULT = "StableDiffusionPipeline"  # the pipeline class a folder without a known one is read as

__all__ = ["FamilyBase", "check_solver", "family_class", "load_family", "load_student_family", "registry",
           "solvers_of", "forbidden_names"]


@functools.lru_cache(maxsize=None)
def registry() -> dict[str, type[FamilyBase]]:
    """{pipeline class name: family class} of every family module in this package."""
    found: dict[str, type[FamilyBase]] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, FamilyBase) and obj.pipeline_class
                    and obj.__module__ == module.__name__):
                if obj.pipeline_class in found:
                    raise RuntimeError(f"two families claim {obj.pipeline_class}: {found[obj.pipeline_class]} and {obj}")
                found[obj.pipeline_class] = obj
    return found


def pipeline_class_of(pretrained: str) -> str | None:
    """The ``_class_name`` of a folder's ``model_index.json`` (None without one)."""
    index = Path(loading.resolve_path(pretrained)) / "model_index.json"
    return json.loads(index.read_text()).get("_class_name") if index.is_file() else None


def family_class(pretrained: str) -> type[FamilyBase]:
    """The family of folder / hub id ``pretrained``: by its pipeline class, else SD 1.x/2.x."""
    families = registry()
    return families.get(pipeline_class_of(pretrained), families[DEFAULT])


def load_family(pretrained: str, kind: str | None = None, **options) -> FamilyBase:
    """The family model of ``pretrained`` read as ``kind`` (None: what the folder says); ``options`` (None = unset)
    are the family's loading options (e.g. an SDXL ``vae``, a Flux ``resolution``), refused by a family without them."""
    cls = family_class(pretrained)
    given = {k: v for k, v in options.items() if v is not None and k not in cls.ignores}
    for key, value in given.items():
        if key not in cls.options:
            takers = [c.title for c in registry().values() if key in c.options] or ["no"]
            raise ValueError(f"{key}={value!r} is an option of {' / '.join(takers)} models; '{pretrained}' is read "
                             f"as a {cls.name} folder ({cls.pipeline_class}), not one of those")
    return cls.load(pretrained, kind=kind, **given)


def load_student_family(init: str, parameterization: str, **settings) -> FamilyBase:
    """The family of a student trained from ``init`` (``FamilyBase.for_student``: validation included)."""
    return family_class(init).for_student(init, parameterization, **settings)


def forbidden_names() -> set[str]:
    """Every word that names a family (name, title, pipeline class, family class): what stages never spell."""
    out: set[str] = set()
    for cls in registry().values():
        out |= {cls.name, cls.title, cls.pipeline_class, cls.__name__}
    from instaflow.models import sampler  # its alias of a family class (TextToImage) names one too

    classes = set(registry().values())
    out |= {name for name, obj in vars(sampler).items() if isinstance(obj, type) and obj in classes}
    return {n for n in out if n}
