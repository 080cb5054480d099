"""Options declared once: a config dataclass field *is* the option (flag, default, help, aliases, scope).

A CLI's parser is derived from its config classes (:func:`add_options`) and the
configs are built back from the parsed flags (:func:`from_flags`), so adding an
option is adding one field.  The field holds the value code uses; when the flag
spells it differently (MiB for bytes, ``a=1,b=2`` for a mapping) the field says how
to convert, and its default is the converted flag default — one default, written
once.  The scope says what a changed value means when a run resumes
(``pipeline.train.recipe``): ``model`` another model (refused), ``training`` a
change that is reported, ``invocation`` one command's business (never compared).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from typing import Any

MODEL, TRAINING, INVOCATION = "model", "training", "invocation"
_KEY = "option"


@dataclasses.dataclass(frozen=True)
class Option:
    """What a field declares about its flag."""

    help: str
    flag: str | None = None  # the flag's name without dashes (default: the field's name)
    aliases: tuple[str, ...] = ()  # other spellings of the same flag (the original tool's, for instance)
    const_aliases: tuple[tuple[str, Any], ...] = ()  # (flag, value): a switch that sets this option to value
    choices: tuple[Any, ...] | None = None
    scope: str = TRAINING
    flag_type: Callable[[str], Any] | None = None  # how the flag's text is read (default: from the field's type)
    flag_default: Any = None  # the flag's default when it differs from the field's (before convert)
    convert: Callable[[Any, argparse.Namespace | None], Any] | None = None  # flag value (and all flags) -> field
    nargs: str | None = None
    append: bool = False  # a repeatable flag (a list)
    metavar: str | None = None
    weights: bool = False  # a NAME=WEIGHT list (checked as such in recipes)
    positional: bool = False  # an argument without dashes
    required: bool = False

    def name(self, field: dataclasses.Field) -> str:
        return self.flag or field.name


def option(default: Any, help: str, **declared: Any) -> Any:
    """A config field that is also a command-line option (see :class:`Option` for ``declared``).

    ``default`` is the flag's default; the field's default is ``convert(default)`` when
    ``convert`` is given.
    """
    spec = Option(help=help, flag_default=default, **declared)
    value = spec.convert(default, None) if spec.convert else default
    meta = {_KEY: spec}
    if isinstance(value, list | dict | set):
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=value, metadata=meta)


def options_of(cls: type) -> list[tuple[dataclasses.Field, Option]]:
    """The fields of ``cls`` that are options, in declaration order."""
    return [(f, f.metadata[_KEY]) for f in dataclasses.fields(cls) if _KEY in f.metadata]


def _flag_type(cls: type, field: dataclasses.Field, spec: Option) -> Callable[[str], Any] | None:
    if spec.flag_type is not None:
        return spec.flag_type
    if spec.convert is not None:
        return None  # text, converted afterwards
    hint = typing.get_type_hints(cls)[field.name]
    for candidate in (int, float):
        if hint is candidate or candidate in typing.get_args(hint):
            return candidate
    return None


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, skip: tuple[str, ...] = ()):
    """One argparse flag per option field of ``cls`` (aliases and switch aliases included)."""
    for field, spec in options_of(cls):
        name = spec.name(field)
        if name in skip:
            continue
        if spec.positional:
            parser.add_argument(name, help=spec.help)
            continue
        kwargs: dict[str, Any] = {"dest": name, "help": spec.help, "default": spec.flag_default}
        if spec.required:
            kwargs["required"] = True
        if spec.flag_default is False and spec.choices is None and _flag_type(cls, field, spec) is None:
            kwargs["action"] = "store_true"
        else:
            flag_type = _flag_type(cls, field, spec)
            if flag_type is not None:
                kwargs["type"] = flag_type
            if spec.choices is not None:
                kwargs["choices"] = list(spec.choices)
            if spec.nargs:
                kwargs["nargs"] = spec.nargs
            if spec.append:
                kwargs["action"] = "append"
            if spec.metavar:
                kwargs["metavar"] = spec.metavar
        parser.add_argument(f"--{name}", *(f"--{alias}" for alias in spec.aliases), **kwargs)
        for switch, value in spec.const_aliases:
            parser.add_argument(f"--{switch}", dest=name, action="store_const", const=value, help=f"= --{name} {value}")


def from_flags(cls: type, args: argparse.Namespace, **fields: Any):
    """``cls`` from parsed flags: every option field read (and converted) from its flag; ``fields`` the rest."""
    values = {}
    for field, spec in options_of(cls):
        value = getattr(args, spec.name(field))
        values[field.name] = spec.convert(value, args) if spec.convert else value
    return cls(**values, **fields)


def flag_names(*classes: type, scope: str | None = None) -> frozenset[str]:
    """The flags (names without dashes) the classes declare, of one scope or all."""
    return frozenset(
        spec.name(field) for cls in classes for field, spec in options_of(cls) if scope in (None, spec.scope)
    )


def weight_flags(*classes: type) -> tuple[str, ...]:
    return tuple(spec.name(field) for cls in classes for field, spec in options_of(cls) if spec.weights)
