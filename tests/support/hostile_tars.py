"""Tar shards rewritten to be hostile (links, names leaving the folder, pickles)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from helpers import synthetic_task


def rewrite(path: Path, mutate) -> None:
    """Rewrite a tar through ``mutate([(TarInfo, bytes)]) -> [(TarInfo, bytes)]``."""
    with tarfile.open(path) as tin:
        members = [(m, tin.extractfile(m).read()) for m in tin]
    with tarfile.open(path, "w") as tout:
        for info, data in mutate(members):
            if info.isreg():
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))
            else:
                tout.addfile(info)


def link(kind: bytes, name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.fixture
def hostile(tmp_path):
    """A task of 6 shards × 5 samples; every shard but the first is damaged in its own way.

    Returns (task folder, {problem: the sample key it hits}); the truncated last shard loses its last samples.
    """
    task = synthetic_task(tmp_path, "t", samples=30, per_shard=5)
    shards = sorted((task / "src1").glob("*.tar"))
    hits = {}

    def swap_member(key, ext, info_data):  # replace one member of ``key`` by ``info_data``
        def mutate(members):
            return [info_data if m.name == f"{key}.{ext}" else (m, d) for m, d in members]

        return mutate

    hits["symlink"] = "s-0000005"
    rewrite(
        shards[1],
        swap_member("s-0000005", "target.png", (link(tarfile.SYMTYPE, "s-0000005.target.png", "/etc/passwd"), b"")),
    )
    hits["hardlink"] = "s-0000011"
    rewrite(
        shards[2],
        swap_member(
            "s-0000011", "source0.png", (link(tarfile.LNKTYPE, "s-0000011.source0.png", "s-0000010.source0.png"), b"")
        ),
    )
    hits["escape"] = "../../../../tmp/escape"

    def escape(members):
        key = "s-0000016"
        return [
            (tarfile.TarInfo(m.name.replace(key, hits["escape"])), d) if m.name.startswith(key) else (m, d)
            for m, d in members
        ]

    rewrite(shards[3], escape)
    hits["lone image"] = "s-0000021"  # an image without its json

    def lone(members):
        return [(m, d) for m, d in members if m.name != "s-0000021.json"]

    rewrite(shards[4], lone)
    hits["short npy"] = "s-0000022"

    def short_npy(members):
        return [(m, d[:-6]) if m.name == "s-0000022.emb_en.npy" else (m, d) for m, d in members]

    rewrite(shards[4], short_npy)
    data = shards[5].read_bytes()
    shards[5].write_bytes(data[: len(data) // 2])  # truncated mid-shard
    return task, hits
