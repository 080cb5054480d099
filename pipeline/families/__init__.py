"""Model families: where the model lives. Which family a model folder, a ``--plan`` name or a task belongs to.

A family (``base.ModelFamily``) answers every question that depends on the model;
this module finds it: from a model folder's ``model_index.json`` ``_class_name``,
from a ``--transformer_path`` folder's ``config.json``, from a ``--plan`` name, or
from a task's manifest (``family``; a manifest without it is ``qwen_edit``, as
every v1 task is). Anything unknown is refused in one line naming it and the
supported ones.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from pipeline.errors import UserError
from pipeline.families.base import ModelFamily
from pipeline.families.qwen_edit import FAMILY as QWEN_EDIT
from pipeline.families.qwen_image21 import FAMILY as QWEN_IMAGE21
from pipeline.shards.format import DEFAULT_FAMILY

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (QWEN_EDIT, QWEN_IMAGE21)}
assert DEFAULT_FAMILY in FAMILIES


def get(name: str | None) -> ModelFamily:
    """The family of this name (None: the family of tasks whose manifest names none)."""
    family = FAMILIES.get(name or DEFAULT_FAMILY)
    if family is None:
        raise UserError(f"unknown model family {name!r}; this version knows {', '.join(sorted(FAMILIES))}")
    return family


def _supported(attribute: str) -> str:
    return "; ".join(f"{f.name}: {', '.join(getattr(f, attribute))}" for f in FAMILIES.values())


def _class_name(config: Path, what: str) -> str | None:
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{config}: not a readable {what} ({exc})") from None
    return value if isinstance(value, str) else None


@functools.lru_cache(maxsize=32)
def detect(model_path: str) -> ModelFamily:
    """The family of a diffusers model folder, from its ``model_index.json`` (of a transformer folder, from its
    ``config.json``); a name of ``--plan``'s published models maps to its family too. A folder of another class
    is refused in one line naming it."""
    for family in FAMILIES.values():
        if model_path in family.plan_models:
            return family
    index = Path(model_path).expanduser() / "model_index.json"
    config = Path(model_path).expanduser() / "config.json"
    if not index.is_file() and config.is_file():  # a transformer folder (an export, a --transformer_path)
        name = _class_name(config, "config.json")
        for family in FAMILIES.values():
            if name in family.transformer_classes:
                return family
        raise UserError(f"{config}: {name!r} is not a supported transformer ({_supported('transformer_classes')})")
    if not index.is_file():
        raise UserError(
            f"{model_path}: no model_index.json (a diffusers model folder has one; published names for --plan: "
            f"{', '.join(name for f in FAMILIES.values() for name in f.plan_models)})"
        )
    name = _class_name(index, "model_index.json")
    for family in FAMILIES.values():
        if name in family.pipeline_classes:
            return family
    raise UserError(f"{index}: pipeline class {name!r} is not a supported model ({_supported('pipeline_classes')})")


def check_transformer_folder(family: ModelFamily, folder: str) -> None:
    """A ``--transformer_path`` folder must hold a transformer of the model's family (its ``config.json``)."""
    config = Path(folder).expanduser() / "config.json"
    if not config.is_file():
        return  # the loaders say what is missing
    name = _class_name(config, "transformer config")
    if name is not None and name not in family.transformer_classes:
        raise UserError(
            f"--transformer_path {folder}: a {name}, not a transformer of the model's family {family.name} "
            f"({', '.join(family.transformer_classes)})"
        )


PROMPT_STYLES = tuple(dict.fromkeys(style for f in FAMILIES.values() for style in f.prompt_styles))


def prompt_style_help(when: str = "") -> str:
    """``--prompt_style``'s help: every family's styles (a model takes only its family's)."""
    styles = "; ".join(
        f"{name}: {help_text}" for f in FAMILIES.values() for name, help_text in f.prompt_style_help.items()
    )
    return f"{when}{styles}".strip()


def plan_names() -> list[str]:
    return [name for family in FAMILIES.values() for name in family.plan_models]
