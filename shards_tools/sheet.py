"""``preview``: a contact sheet a person can look at (sources → target, instruction under each row)."""

from __future__ import annotations

from pathlib import Path

from pipeline.common import images as imaging
from pipeline.common.preview import contact_sheet
from pipeline.shards.reader import iter_samples, sample_meta
from pipeline.shards.tasks import shard_list


def preview(url: str, out: str, samples: int, storage_options: dict | None) -> int:
    rows = []
    for shard in shard_list(url, storage_options):
        for key, members in iter_samples(shard, storage_options):
            meta = sample_meta(members)
            pictures = [imaging.open_rgb(members[s["member"]]) for s in meta.get("sources", [])]
            pictures.append(imaging.open_rgb(members[meta["target"]["member"]]))
            text = meta.get("instruction") or meta.get("instruction_cn") or "(no instruction)"
            rows.append((pictures, f"{key}: {text}"))
            if len(rows) >= samples:
                break
        if len(rows) >= samples:
            break
    if not rows:
        raise FileNotFoundError(f"{url}: no samples")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(rows).save(out)
    return len(rows)
