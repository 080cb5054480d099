"""Reading shards: byte ranges through the index, or whole shards as a stream; used by training and the tools.

Two ways to read a shard, chosen per shard:

* **indexed** (local files, s3://, gs://, http(s) with a ``.index.json`` beside
  the shard): byte-range reads of just the members a sample needs.  webdataset
  reads tars as a stream and cannot fetch one member by offset, so this reader
  is ours; it is what makes resume a seek and lets a batch fetch only the
  embedding variant it uses.
* **streamed** (``pipe:`` URLs, or shards without an index): the shard is read
  front to back (webdataset's tar iterator) and members are grouped into
  samples by key; training skips the samples another (rank, worker) owns.

Members ending in ``.pyd``/``.pickle``/``.pth``/``.pt`` are never decoded.
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

from pipeline.shards.format import COPY_PREFIX, check_npy, is_forbidden_member, unsafe_name
from pipeline.shards.storage import options_for, protocol_of, with_timeout

log = logging.getLogger(__name__)

READ_RETRIES = 4
READ_TIMEOUT = 60.0  # seconds a range read may wait for data before it counts as failed (then retried)
# errors that retrying cannot fix: a missing or forbidden object, a wrong path, a truncated or malformed tar
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, tarfile.TarError, EOFError, ValueError)


def backoff(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (0-based) of a read: 0.2 s doubling, with jitter so that workers
    that failed together spread out."""
    return 0.2 * 2**attempt * (0.5 + random.random())


class RetryPolicy:
    """Whether a failed read is tried again, and after how long: the one place a transient read error (a reset, a
    timeout, throttling) is told from a permanent one (a missing or forbidden object, malformed data).

    Every read of this module asks its policy; the training stream passes its error handler, a subclass that
    also decides what a sample that stays unreadable costs."""

    def __init__(self, retries: int = READ_RETRIES):
        self.retries = retries

    def retry_after(self, what: str, exc: BaseException, attempt: int) -> float | None:
        """Seconds to wait before reading ``what`` again after failure ``attempt`` (0-based), or None: give up."""
        if isinstance(exc, PERMANENT_ERRORS) or attempt + 1 >= self.retries:
            return None
        delay = backoff(attempt)
        log.warning(
            "transient error reading %s (%s: %s); retry %d in %.1fs", what, type(exc).__name__, exc, attempt + 1, delay
        )
        return delay


def _with_retries(what: str, fn, policy: RetryPolicy):
    """``fn()``, tried again after the delays ``policy`` gives; its last error raised when the policy gives up."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            delay = policy.retry_after(what, exc, attempt)
            if delay is None:
                raise
            time.sleep(delay)
            attempt += 1


class RangeReader:
    """Byte ranges and whole objects from any fsspec URL, with retries; counts bytes read."""

    def __init__(self, storage_options: dict | None, timeout: float = READ_TIMEOUT, policy: RetryPolicy | None = None):
        self.storage_options, self.timeout = storage_options, timeout
        self.policy = policy or RetryPolicy()
        self._fs: dict[str, Any] = {}
        self.bytes_read = 0

    def _resolve(self, url: str):
        protocol = protocol_of(url)
        if protocol not in self._fs:
            options = with_timeout(protocol, options_for(url, self.storage_options), self.timeout)
            self._fs[protocol] = fsspec.core.url_to_fs(url, **options)[0]
        fs = self._fs[protocol]
        return fs, fs._strip_protocol(url)

    def read(self, url: str, start: int | None = None, end: int | None = None) -> bytes:
        fs, path = self._resolve(url)
        data = _with_retries(url, lambda: fs.cat_file(path, start=start, end=end), self.policy)
        if start is not None and end is not None and len(data) != end - start:
            raise OSError(f"{url}: short read at [{start}, {end}) — truncated shard?")
        self.bytes_read += len(data)
        return data


class IndexCache:
    """Per-shard ``.index.json`` documents, least recently used first out (memory stays bounded)."""

    def __init__(self, reader: RangeReader, capacity: int = 64):
        self.reader, self.capacity = reader, capacity
        self._items: OrderedDict[str, list[dict]] = OrderedDict()

    def get(self, url: str) -> list[dict]:
        if url in self._items:
            self._items.move_to_end(url)
            return self._items[url]
        samples = json.loads(self.reader.read(url))["samples"]
        self._items[url] = samples
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return samples


@dataclass
class RawSample:
    """One sample as read: metadata, image bytes, and embeddings (bytes, or offsets to fetch later)."""

    key: str
    meta: dict[str, Any]
    images: dict[str, bytes]  # role -> encoded bytes
    shard_url: str
    embeddings: dict[str, bytes] = field(default_factory=dict)  # variant -> npy bytes (streamed reads)
    embedding_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # variant -> [start, end)
    choice: Any = None  # the run's draws for this sample (the training stream's Choice), made once it is read
    image_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # role -> [start, end) of an original
    # not read yet because its training copy (images["copy_<role>"]) was

    def original(self, role: str, reader: RangeReader) -> bytes:
        """An original image's bytes, read now when only its training copy came with the sample."""
        if role not in self.images:
            self.images[role] = reader.read(self.shard_url, *self.image_ranges[role])
        return self.images[role]


def split_members(key: str, members: dict[str, bytes], shard_url: str) -> RawSample:
    """Turn webdataset-style members into a RawSample; forbidden members are dropped undecoded."""
    meta = json.loads(members["json"].decode("utf-8"))
    images, embeddings = {}, {}
    for ext, data in members.items():
        if ext == "json" or is_forbidden_member(ext):
            continue
        if ext.startswith("emb_") and ext.endswith(".npy"):
            embeddings[ext[4:-4]] = data
        else:
            images[ext.split(".", 1)[0]] = data
    return RawSample(key=key, meta=meta, images=images, shard_url=shard_url, embeddings=embeddings)


def expected_members(meta: dict[str, Any]) -> set[str]:
    """Member extensions a complete sample has, according to its own json."""
    entries = [meta["target"], *meta.get("sources", [])]
    images = [e["member"] for e in entries] + [e["copy"]["member"] for e in entries if "copy" in e]
    return {"json", *images, *(f"emb_{v}.npy" for v in meta.get("variants", {}))}


def eager_members(members: dict[str, Any]) -> list[str]:
    """The members a training read fetches at once: the json, the training copies, and the originals that have
    no copy (originals with a copy and the embeddings are fetched by offset when needed)."""
    names = [ext for ext in members if not ext.startswith("emb_") and not is_forbidden_member(ext)]
    copied = {ext[len(COPY_PREFIX) :].split(".", 1)[0] for ext in names if ext.startswith(COPY_PREFIX)}
    return [ext for ext in names if ext.split(".", 1)[0] not in copied]


def read_indexed_sample(reader: RangeReader, shard_url: str, entry: dict) -> RawSample:
    """Read json + images of one sample in one range request (training copies instead of the originals they
    stand for); embeddings and those originals stay as offsets."""
    members = entry["members"]
    wanted = eager_members(members)
    start = min(members[ext][0] for ext in wanted)
    end = max(members[ext][0] + members[ext][1] for ext in wanted)
    blob = reader.read(shard_url, start, end)
    chosen = {ext: blob[members[ext][0] - start : members[ext][0] - start + members[ext][1]] for ext in wanted}
    sample = split_members(entry["key"], chosen, shard_url)
    for ext, (offset, size) in members.items():
        if ext.startswith("emb_") and ext.endswith(".npy"):
            sample.embedding_ranges[ext[4:-4]] = (offset, offset + size)
        elif ext not in wanted and not is_forbidden_member(ext):
            sample.image_ranges[ext.split(".", 1)[0]] = (offset, offset + size)
    return sample


def open_stream(url: str, storage_options: dict | None):
    """A readable binary stream: ``pipe:`` commands through webdataset's opener, everything else through fsspec."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return fsspec.open(url, "rb", **options_for(url, storage_options)).open()


def split_name(name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` → (``dir/key``, ``ext.more``): webdataset's key convention."""
    folder, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext


def iter_samples(url: str, storage_options: dict | None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of a shard, in file order: consecutive members sharing a key.

    Members that could hold pickle are skipped undecoded.  A read error raises
    after the sample it cut short; the caller decides what it costs.
    """
    from webdataset.tariterators import tar_file_iterator

    key, members = None, {}
    with open_stream(url, storage_options) as handle:
        try:
            for item in tar_file_iterator(handle, skip_meta=None, select_files=lambda n: not is_forbidden_member(n)):
                k, ext = split_name(item["fname"])
                if k != key and members:
                    yield key, members
                    members = {}
                key = k
                members[ext] = item["data"]
        except Exception:
            if members:  # the sample cut off by the error, so the caller sees which members it lacks
                yield key, members
            raise
    if members:
        yield key, members


@dataclass
class CheckedSample:
    """A sample of a shard as the tools see it: its members and what is wrong with how they are stored.

    ``key`` None is the shard's own problem (unreadable from some point on).
    """

    key: str | None
    members: dict[str, bytes]
    problems: list[str]


class _TailWatcher:
    """A read-only file that remembers its last bytes: whether a tar stream ended with its end-of-archive block."""

    KEEP = 1 << 16

    def __init__(self, raw):
        self.raw, self.total, self.tail = raw, 0, bytearray()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.total += len(data)
        self.tail = (self.tail + data)[-self.KEEP :]
        return data

    def zeros_at(self, offset: int) -> bool:
        """Whether the 512 bytes at ``offset`` were read and are all zero (an end-of-archive block)."""
        self.read(tarfile.BLOCKSIZE)  # the stream may not have read that far yet
        start = offset - (self.total - len(self.tail))
        if start < 0:
            return True  # read and dropped long ago: tarfile saw it (it only stops at a zero block or the end)
        block = self.tail[start : start + tarfile.BLOCKSIZE]
        return len(block) == tarfile.BLOCKSIZE and not any(block)


def iter_checked(fileobj) -> Iterator[CheckedSample]:
    """The samples of a tar stream in file order, with hostile members reported instead of skipped or trusted.

    Only regular files belong in a shard: a symlink, hardlink, device or folder member is a
    problem of its sample, as is a name that would extract outside the folder or a member
    that could hold pickle (never decoded).  A read error (a truncated tar) ends the stream
    with a keyless item after the sample it cut short.
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    problems: list[str] = []
    fileobj = _TailWatcher(fileobj)
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for info in tar:
                k, ext = split_name(info.name)
                if k != key and (members or problems):
                    yield CheckedSample(key, members, problems)
                    members, problems = {}, []
                key = k
                why = unsafe_name(info.name)
                if why:
                    problems.append(f"member {info.name!r} has {why}")
                elif not info.isreg():
                    kind = "symlink" if info.issym() else "hardlink" if info.islnk() else "non-file"
                    problems.append(f"member {info.name} is a {kind} (only regular files belong in a shard)")
                elif is_forbidden_member(ext):
                    problems.append(f"pickle-capable member {info.name} (never decoded)")
                else:
                    members[ext] = tar.extractfile(info).read()
            if not fileobj.zeros_at(tar.offset):  # Python's tarfile takes a cut at a header as the end
                raise tarfile.ReadError(f"no end-of-archive block at byte {tar.offset}: the tar is cut short")
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if members or problems:
            yield CheckedSample(key, members, problems + [f"cut short by a read error: {exc}"])
        yield CheckedSample(None, {}, [f"unreadable from here on: {type(exc).__name__}: {exc}"])
        return
    if members or problems:
        yield CheckedSample(key, members, problems)


def stored_problems(item: CheckedSample) -> tuple[dict[str, Any] | None, list[str]]:
    """(the sample's json, what is wrong with it) without decoding images: hostile members, no or bad json, a
    member its json names that is absent, a member it does not name, an ``.npy`` whose header and length disagree."""
    problems = list(item.problems)
    if "json" not in item.members:
        return None, problems + [f"no json member (members: {sorted(item.members) or 'none'})"]
    try:
        meta = sample_meta(item.members)
        expected = expected_members(meta)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, problems + [f"json unusable: {type(exc).__name__}: {exc}"]
    problems += [f"member {name} is missing" for name in sorted(expected - set(item.members))]
    problems += [f"unexpected member {name}" for name in sorted(set(item.members) - expected)]
    for name in sorted(expected & set(item.members)):
        if name.endswith(".npy"):
            try:
                check_npy(item.members[name])
            except Exception as exc:
                problems.append(f"{name} does not decode: {exc}")
    return meta, problems


def iter_checked_samples(url: str, storage_options: dict | None) -> Iterator[CheckedSample]:
    """:func:`iter_checked` over a shard URL (a missing shard raises ``FileNotFoundError``)."""
    with open_stream(url, storage_options) as handle:
        yield from iter_checked(handle)


def sample_meta(members: dict[str, bytes]) -> dict[str, Any]:
    """The sample's own json member."""
    return json.loads(members["json"].decode("utf-8"))


@dataclass
class CorruptSample:
    """Placeholder yielded by :func:`stream_shard` for a sample that cannot be used."""

    reason: str


def stream_shard(
    url: str, storage_options: dict | None, policy: RetryPolicy | None = None
) -> Iterator[RawSample | CorruptSample]:
    """Samples of one shard in file order, checked; what cannot be used is reported, not decided, here.

    A sample that is malformed comes as a :class:`CorruptSample`. A read error reopens the
    shard after the delay ``policy`` gives and skips the samples already produced, like
    indexed reads are retried; when the policy gives up (a truncated or malformed tar,
    retries used up), one last :class:`CorruptSample` stands for the rest of the shard.
    A missing or forbidden shard raises: the caller's handler decides what it costs.
    """
    policy = policy or RetryPolicy()
    produced, failures = 0, 0
    while True:
        samples = iter_samples(url, storage_options)
        try:
            for _ in range(produced):  # what the broken read had already produced
                next(samples)
            while True:
                try:
                    key, members = next(samples)
                except StopIteration:
                    return
                produced += 1
                try:
                    if "json" not in members:
                        raise ValueError("no json member")
                    raw = split_members(key, members, url)
                    missing = expected_members(raw.meta) - set(members)
                    if missing:
                        raise ValueError(f"members missing (truncated shard?): {sorted(missing)}")
                    for data in raw.embeddings.values():
                        check_npy(data)
                except Exception as exc:  # the caller counts and skips it
                    yield CorruptSample(f"{url}: sample {key}: {type(exc).__name__}: {exc}")
                    continue
                yield raw
        except (FileNotFoundError, PermissionError):
            raise
        except StopIteration:  # the shard is shorter than on the first read
            return
        except Exception as exc:
            delay = policy.retry_after(f"{url} (streamed, from sample {produced})", exc, failures)
            failures += 1
            if delay is None:
                yield CorruptSample(
                    f"{url}: the rest of the shard from sample {produced} ({type(exc).__name__}: {exc})"
                )
                return
            time.sleep(delay)
