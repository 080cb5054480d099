"""``preview``: a contact sheet a person can look at (sources → target, instruction under each row)."""

from __future__ import annotations

from pathlib import Path

from pipeline.common import images as imaging
from pipeline.common.preview import contact_sheet
from pipeline.errors import DataError
from pipeline.shards.reader import iter_checked_samples, stored_problems
from pipeline.shards.tasks import shard_list


def preview(url: str, out: str, samples: int, storage_options: dict | None) -> tuple[int, list[dict]]:
    """Write the sheet of the first ``samples`` usable samples; (rows written, problems met on the way)."""
    rows, problems = [], []
    for shard in shard_list(url, storage_options):
        for item in iter_checked_samples(shard, storage_options):
            meta, found = stored_problems(item)
            try:
                if not found:
                    pictures = [imaging.open_rgb(item.members[s["member"]]) for s in meta.get("sources", [])]
                    pictures.append(imaging.open_rgb(item.members[meta["target"]["member"]]))
            except Exception as exc:  # an image that does not decode
                found = [f"{type(exc).__name__}: {exc}"]
            if found:
                problems.append({"shard": shard, "key": item.key, "problem": "; ".join(found)})
                continue
            text = meta.get("instruction") or meta.get("instruction_cn") or "(no instruction)"
            rows.append((pictures, f"{item.key}: {text}"))
            if len(rows) >= samples:
                break
        if len(rows) >= samples:
            break
    if rows:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(rows).save(out)
    elif not problems:
        raise DataError(f"{url}: no samples")
    return len(rows), problems
