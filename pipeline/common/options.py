"""Options declared once: a config dataclass field *is* the option (flag, default, help, aliases, scope).

A CLI's parser is derived from its config classes (:func:`add_options`) and the
configs are built back from the parsed flags (:func:`from_flags`), so adding an
option is adding one field.  The field holds the value code uses; when the flag
spells it differently (MiB for bytes, ``a=1,b=2`` for a mapping) the field says how
to convert, and its default is the converted flag default — one default, written
once.  The scope says what a changed value means when a run resumes
(``pipeline.train.recipe``): ``model`` another model (refused), ``training`` a
change that is reported, ``invocation`` one command's business (never compared).

Each option also declares its valid values (``check=``: :func:`at_least`,
:func:`between`); a float option is finite whatever else it declares. A config
class that derives from :class:`Checked` checks every option field when it is
built, so no config with a NaN learning rate or a negative limit ever exists, and
the message names the flag. :func:`one_name_per_option` refuses an option given
under two of its names with different values.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Callable
from typing import Any

from pipeline.errors import UserError

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
    unordered: bool = False  # a list of patterns whose order, spacing and repeats mean nothing (compared as a set)
    positional: bool = False  # an argument without dashes
    required: bool = False
    check: Callable[[Any], str | None] | None = None  # the value's rule: None when valid, else what it must be

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


def at_least(low: float) -> Callable[[Any], str | None]:
    """A number >= ``low`` (None, where the field allows it, passes)."""
    return lambda value: None if value is None or value >= low else f"a number >= {low:g}"


def greater_than(low: float) -> Callable[[Any], str | None]:
    return lambda value: None if value is None or value > low else f"a number > {low:g}"


def non_empty(value: Any) -> str | None:
    """A path that names something: ``--output_dir ''`` would write into the working folder."""
    return "a path, not empty" if isinstance(value, str) and not value.strip() else None


def between(low: float, high: float, high_open: bool = False) -> Callable[[Any], str | None]:
    """A number in ``[low, high]`` (``[low, high)`` with ``high_open``)."""
    right = ")" if high_open else "]"

    def rule(value: Any) -> str | None:
        inside = value is None or (low <= value < high if high_open else low <= value <= high)
        return None if inside else f"a number in [{low:g}, {high:g}{right}"

    return rule


class Checked:
    """Base of a config dataclass whose option fields check themselves when it is built (``__post_init__``).

    Subclasses add their cross-field checks by overriding ``__post_init__`` and
    calling ``super().__post_init__()`` first.
    """

    def __post_init__(self) -> None:
        for field, spec in options_of(type(self)):
            problem = _problem(getattr(self, field.name), spec)
            if problem:
                flag = f"--{spec.name(field)}" if not spec.positional else spec.name(field)
                raise UserError(f"{flag} must be {problem}, got {getattr(self, field.name)!r}")


def _problem(value: Any, spec: Option) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    return spec.check(value) if spec.check is not None else None


def one_name_per_option(parser: argparse.ArgumentParser, tokens: list[str], where: str = "the command line") -> None:
    """Refuse one option given under two of its names (``--lora_r 8 --lora_rank 4``, ``--parallelism ddp
    --use_fsdp``) with different values: argparse would keep the last one silently."""
    actions = parser._option_string_actions
    seen: dict[str, tuple[str, Any]] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("--") or token == "--":
            continue
        name, has_value, inline = token.partition("=")
        action = actions.get(name) or _abbreviated(actions, name)
        if action is None or action.dest == "help":
            continue
        if action.nargs == 0:
            value: Any = action.const
        elif action.nargs is None and (has_value or i < len(tokens)):
            text = inline if has_value else tokens[i]
            i += 0 if has_value else 1
            try:
                value = action.type(text) if action.type is not None else text
            except (TypeError, ValueError):
                value = text  # argparse names the bad value itself
        else:
            continue  # lists: one name each
        earlier = seen.get(action.dest)
        if earlier is not None and earlier[0] != name and earlier[1] != value:
            raise UserError(
                f"{where} gives one option under two names with different values: {earlier[0]} {earlier[1]!r} and "
                f"{name} {value!r}; keep one"
            )
        seen[action.dest] = (name, value)


def _abbreviated(actions: dict[str, argparse.Action], prefix: str) -> argparse.Action | None:
    """argparse's unique-prefix abbreviation (``--lora_ra`` for ``--lora_rank``)."""
    matches = {a for option_string, a in actions.items() if option_string.startswith(prefix)}
    return matches.pop() if len(matches) == 1 else None


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
            parser.add_argument(name, help=spec.help, **({"metavar": spec.metavar} if spec.metavar else {}))
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


def derived(cls: type, source: Any, **fields: Any):
    """``cls`` built from ``source``'s fields of the same names (the options a stage takes of a CLI's config,
    never copied by hand one by one); ``fields`` give the rest. Every field of ``cls`` comes from one of them."""
    names = {f.name for f in dataclasses.fields(cls)}
    taken = {name: getattr(source, name) for name in names - fields.keys() if hasattr(source, name)}
    missing = names - taken.keys() - fields.keys()
    if missing:
        raise TypeError(f"{cls.__name__}: {sorted(missing)} neither in {type(source).__name__} nor given")
    return cls(**taken, **fields)


def flag_names(*classes: type, scope: str | None = None) -> frozenset[str]:
    """The flags (names without dashes) the classes declare, of one scope or all."""
    return frozenset(
        spec.name(field) for cls in classes for field, spec in options_of(cls) if scope in (None, spec.scope)
    )


def weight_flags(*classes: type) -> tuple[str, ...]:
    return tuple(spec.name(field) for cls in classes for field, spec in options_of(cls) if spec.weights)


def unordered_flags(*classes: type) -> tuple[str, ...]:
    return tuple(spec.name(field) for cls in classes for field, spec in options_of(cls) if spec.unordered)
