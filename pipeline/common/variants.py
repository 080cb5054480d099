"""Which embedding variants a sample gets: the same for every model family (the shard format's variants)."""

from __future__ import annotations

from pipeline.shards.format import VARIANT_TEXT


def plan_variants(texts: dict[str, str], num_sources: int, inverse: bool) -> list[tuple[str, str, str]]:
    """(variant, conditioning images "sources"|"target"|"none", text) for one sample.

    Empty instructions get no embedding; ``drop`` exists for edits only (T2I
    samples share the task's null embedding); inverse variants need exactly one
    source and are conditioned on the target.
    """
    images = "sources" if num_sources else "none"
    plan = [(v, images, texts[VARIANT_TEXT[v]]) for v in ("en", "cn") if texts[VARIANT_TEXT[v]]]
    if num_sources:
        plan.append(("drop", "sources", ""))
    if inverse and num_sources == 1:
        inv = [(v, "target", texts[VARIANT_TEXT[v]]) for v in ("en_inv", "cn_inv") if texts[VARIANT_TEXT[v]]]
        if inv:
            plan.extend(inv)
            plan.append(("drop_inv", "target", ""))
    return plan
