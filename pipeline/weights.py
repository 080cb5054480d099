"""The one parser for ``name=weight,name=weight`` flags (task and source-count weights)."""

from __future__ import annotations


def parse_weights(text: str, flag: str) -> dict[str, float]:
    """``"a=0.5,b=1.2"`` → ``{"a": 0.5, "b": 1.2}``; clear errors naming the flag."""
    weights: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"{flag}: expected NAME=WEIGHT, got {item!r}")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"{flag}: weight of {name!r} is not a number: {value!r}") from None
        if weight < 0 or weight != weight:
            raise ValueError(f"{flag}: weight of {name!r} must be >= 0, got {value!r}")
        if name in weights:
            raise ValueError(f"{flag}: {name!r} is listed twice")
        weights[name] = weight
    if not weights:
        raise ValueError(f"{flag}: no weights given")
    return weights
