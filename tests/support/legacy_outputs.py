"""The original tool's output, written for convert-legacy's tests."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from helpers import read_samples
from PIL import Image

from pipeline.shards.format import npy_to_embedding

HIDDEN = 64


SUFFIXES = ("en", "cn", "droptext", "en_inv", "cn_inv", "droptext_inv")


VARIANT_OF = {
    "en": "en",
    "cn": "cn",
    "droptext": "drop",
    "en_inv": "en_inv",
    "cn_inv": "cn_inv",
    "droptext_inv": "drop_inv",
}


def original_output(
    work: Path, sample_data_dir: Path, task: str, *, ranks: int = 2, t2i: bool = False, copies: int = 1, seed: int = 0
) -> dict[tuple[str, int, str], torch.Tensor]:
    """Write what the original extraction leaves in ``work``; returns {(rank file, line in it, suffix): tensor}."""
    rows = [json.loads(x) for x in (sample_data_dir / task / "data.jsonl").read_text().splitlines()] * copies
    (work / "images").mkdir(parents=True, exist_ok=True)
    (work / "out_jsonl").mkdir(exist_ok=True)
    (work / "embeddings" / "data").mkdir(parents=True, exist_ok=True)

    def local(ref: str) -> str:  # the input's images, copied under the working folder, referenced relatively
        name = f"{task}_{Path(ref).name}"
        if not (work / "images" / name).exists():
            shutil.copy(sample_data_dir / task / ref, work / "images" / name)
        return f"images/{name}"

    gen, order = torch.Generator().manual_seed(seed), random.Random(seed)
    per_rank: dict[int, list[tuple[int, dict]]] = {r: [] for r in range(ranks)}
    for lineno, row in enumerate(rows):
        src = row.get("source_image")
        sources = [] if src is None else [src] if isinstance(src, str) else list(src)
        line = {
            "source_image": None if not sources else [local(s) for s in sources] if len(sources) > 1 else local(src),
            "edit_image": local(row["target_image"]),
            **{k: row.get(k, "") for k in ("instruction", "instruction_cn", "inverse_instruction")},
            "source_image_size": [
                dict(zip(("width", "height"), Image.open(sample_data_dir / task / s).size, strict=True))
                for s in sources
            ],
            "edit_image_size": dict(
                zip(("width", "height"), Image.open(sample_data_dir / task / row["target_image"]).size, strict=True)
            ),
        }
        suffixes = SUFFIXES[:2] if t2i else SUFFIXES[:3] + (SUFFIXES[3:] if len(sources) == 1 else ())
        for suffix in suffixes:
            path = f"embeddings/data/{lineno}_{suffix}.pt"
            torch.save(torch.randn(7 + lineno % 5, HIDDEN, generator=gen).to(torch.bfloat16), work / path)
            line[f"embeddings_tensor_{suffix}"] = path
        per_rank[lineno % ranks].append((lineno, line))
    expected = {}
    for rank, lines in per_rank.items():
        order.shuffle(lines)  # the original's DataLoader shuffles: output order is not input order
        name = f"data_rank_{rank:03d}.jsonl"
        (work / "out_jsonl" / name).write_text(
            "".join(json.dumps(line, ensure_ascii=False) + "\n" for _, line in lines)
        )
        for number, (_, line) in enumerate(lines):
            for key, path in line.items():
                if key.startswith("embeddings_tensor_"):
                    expected[(name, number, key[len("embeddings_tensor_") :])] = torch.load(
                        work / path, weights_only=True
                    )
    return expected


def assert_every_tensor_kept(out: Path, expected: dict, rank_files: list[str]) -> int:
    checked = 0
    for sample in read_samples(str(out)).values():
        meta = json.loads(sample["json"])
        name = Path(meta["input"]).name
        assert name in rank_files
        for suffix in SUFFIXES:
            want = expected.get((name, meta["line"], suffix))
            variant = VARIANT_OF[suffix]
            if want is None or (variant == "drop" and meta["num_sources"] == 0):
                assert variant not in meta["variants"]
                continue
            assert torch.equal(npy_to_embedding(sample[f"emb_{variant}.npy"]), want)  # bit-identical
            checked += 1
    return checked
