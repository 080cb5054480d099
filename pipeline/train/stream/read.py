"""Read: element id → the sample, with the run's draws for it (``decide.py``) and the embedding they chose.

The read stage of an indexed stream: it locates an element in the order
(``order.IndexedOrder``), checks the shard's index against the manifest the
order was sized from, reads the sample's json and images in one range read, then
decides its draws and reads the one embedding variant the batch will use, so the
read-ahead brings everything a batch needs. It raises what it cannot read; the
stream's error handler decides what that costs.
"""

from __future__ import annotations

from pipeline.shards.reader import IndexCache, RangeReader, RawSample, eager_members, read_indexed_sample
from pipeline.shards.tasks import Shard
from pipeline.train.config.data import StreamConfig
from pipeline.train.stream.decide import decide
from pipeline.train.stream.errors import UnusableData
from pipeline.train.stream.order import IndexedOrder


class IndexedReads:
    """The samples of one stream's indexed shards, by element."""

    def __init__(
        self,
        task: str,
        n: int,
        shards: list[Shard],
        order: IndexedOrder,
        reader: RangeReader,
        index_cache: IndexCache,
        config: StreamConfig,
    ):
        self.task, self.n, self.shards, self.order = task, n, shards, order
        self.reader, self.index_cache, self.config = reader, index_cache, config

    def entry(self, g: int) -> tuple[str, dict]:
        """The shard URL and index entry of element ``g``."""
        shard, sample = self.order.locate(g)
        entry = self.shards[shard]
        index = self.index_cache.get(entry.index_url)
        if len(index) != entry.samples:  # the order was sized from the manifest: it must not lie
            raise UnusableData(
                f"task {self.task}: the manifest says {entry.samples} samples in {entry.url}, its index "
                f"{entry.index_url} lists {len(index)}; check the task with python -m shards_tools verify"
            )
        return entry.url, index[sample]

    def size_of(self, g: int) -> int:
        """Bytes the read of element ``g`` brings: eager members and the largest embedding."""
        members = self.entry(g)[1]["members"]
        size = sum(members[ext][1] for ext in eager_members(members))
        return size + max((m[1] for ext, m in members.items() if ext.startswith("emb_")), default=0)

    def read(self, g: int) -> RawSample:
        url, entry = self.entry(g)
        sample = read_indexed_sample(self.reader, url, entry)
        sample.choice = decide(sample.meta, self.config, self.task, self.n, (g,))
        variant = sample.choice.variant
        if not self.config.online_prompts and variant in sample.embedding_ranges:
            sample.embeddings[variant] = self.reader.read(url, *sample.embedding_ranges[variant])
        return sample
