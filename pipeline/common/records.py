"""Input rows: parse and validate one JSONL line into a :class:`Record` — the one row schema.

Every reader of such rows (extraction, the failures file, convert-legacy, the
sample data kit's own check, training's ``--validation_jsonl``) goes through
:func:`parse_line`, so a row means the same everywhere and a bad row is reported
the same way: file, 0-based line number, field, reason.  Validation rows have no
target (``require_target=False``).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.shards.format import MAX_SOURCES, TEXT_FIELDS
from pipeline.shards.storage import has_scheme, options_for

# Accepted alternative spellings of the image columns (the original tool's
# ``edit_image`` among them); the configured column name always wins.
SOURCE_ALIASES = ("source_images",)
TARGET_ALIASES = ("edit_image",)


class RecordError(ValueError):
    """A row that cannot become a sample; names where and why."""

    def __init__(self, file: str, line: int, field: str | None, reason: str):
        self.file = file
        self.line = line
        self.field = field
        self.reason = reason
        where = f"{file} line {line}" + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {reason}")

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "field": self.field, "reason": self.reason}


@dataclass(frozen=True)
class Columns:
    """Names of the image columns (overridable from the CLIs)."""

    source: str = "source_image"
    target: str = "target_image"


@dataclass(frozen=True)
class Record:
    """One validated input sample; image references are absolute paths or URLs."""

    file: str
    line: int
    sources: tuple[str, ...]
    target: str
    instruction: str = ""
    instruction_cn: str = ""
    inverse_instruction: str = ""
    inverse_instruction_cn: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_sources(self) -> int:
        return len(self.sources)

    @property
    def texts(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in TEXT_FIELDS}


def parent_of(uri: str) -> str:
    """The folder holding ``uri`` (a local path or a URL)."""
    return posixpath.dirname(uri.rstrip("/")) if has_scheme(uri) else posixpath.dirname(uri)


def resolve_ref(ref: str, base_dir: str) -> str:
    """Resolve an image reference against the JSONL's folder (paths and URLs)."""
    if has_scheme(ref) or posixpath.isabs(ref) or not base_dir:
        return ref
    if has_scheme(base_dir):
        scheme, _, path = base_dir.partition("://")
        return f"{scheme}://{posixpath.normpath(posixpath.join(path, ref))}"
    return posixpath.normpath(posixpath.join(base_dir, ref))


def _pick(row: dict[str, Any], name: str, aliases: tuple[str, ...]) -> tuple[str, Any, bool]:
    """Return (field name used, value, present?) for a column and its aliases."""
    for key in (name, *aliases):
        if key in row:
            return key, row[key], True
    return name, None, False


def _image_ref(value: Any, file: str, line: int, fieldname: str, base_dir: str) -> str:
    if not isinstance(value, str):
        raise RecordError(file, line, fieldname, f"expected a string path or URL, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(file, line, fieldname, "empty path")
    return resolve_ref(value.strip(), base_dir)


def parse_row(
    row: Any,
    file: str,
    line: int,
    columns: Columns = Columns(),
    base_dir: str | None = None,
    require_target: bool = True,
) -> Record:
    """Validate a decoded JSON value as a sample row (without ``require_target``, the target may be absent: "")."""
    if not isinstance(row, dict):
        raise RecordError(file, line, None, f"expected a JSON object, got {type(row).__name__}")
    base = parent_of(file) if base_dir is None else base_dir

    target_key, target, present = _pick(row, columns.target, TARGET_ALIASES)
    if (not present or target is None) and require_target:
        raise RecordError(file, line, columns.target, "missing target image")
    target_ref = "" if not present or target is None else _image_ref(target, file, line, target_key, base)

    source_key, raw_sources, _ = _pick(row, columns.source, SOURCE_ALIASES)
    if raw_sources is None:
        raw_sources = []
    elif isinstance(raw_sources, str):
        raw_sources = [raw_sources]
    elif not isinstance(raw_sources, list):
        raise RecordError(
            file, line, source_key, f"expected null, a string or a list of strings, got {type(raw_sources).__name__}"
        )
    if len(raw_sources) > MAX_SOURCES:
        raise RecordError(file, line, source_key, f"{len(raw_sources)} source images, at most {MAX_SOURCES} allowed")
    sources = tuple(_image_ref(s, file, line, f"{source_key}[{i}]", base) for i, s in enumerate(raw_sources))

    texts: dict[str, str] = {}
    for name in TEXT_FIELDS:
        value = row.get(name)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise RecordError(file, line, name, f"expected a string or null, got {type(value).__name__}")
        texts[name] = value.strip()

    used = {target_key, source_key, *TEXT_FIELDS}
    extra = _small_fields({k: v for k, v in row.items() if k not in used})
    return Record(file=file, line=line, sources=sources, target=target_ref, extra=extra, **texts)


MAX_NESTING = 64  # deeper JSON values are refused (they break json.dumps in the writer, or json.loads itself)


def _small_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields the format does not use, kept for the user up to :data:`MAX_EXTRA_FIELD_BYTES` each; larger ones
    are named in ``_dropped`` (a 100 MB field must not be stored in every sample's json)."""
    kept, dropped = {}, []
    for key, value in fields.items():
        size = len(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        (dropped.append(key) if size > MAX_EXTRA_FIELD_BYTES else kept.__setitem__(key, value))
    if dropped:
        kept["_dropped"] = sorted(dropped)
    return kept


def parse_line(
    text: str,
    file: str,
    line: int,
    columns: Columns = Columns(),
    base_dir: str | None = None,
    require_target: bool = True,
) -> Record:
    """Decode and validate one JSONL line (``line`` is 0-based)."""
    if isinstance(text, OversizedLine):
        raise RecordError(file, line, None, f"row too large: {text.size} bytes, over the {text.cap}-byte limit")
    bad = _first_surrogate(text)
    if bad is not None:  # iter_lines keeps undecodable bytes as surrogate escapes
        raise RecordError(file, line, None, f"invalid UTF-8 (byte 0x{ord(text[bad]) - 0xDC00:02x} at column {bad + 1})")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(file, line, None, f"malformed JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise RecordError(file, line, None, "malformed JSON: nested too deeply to decode") from None
    problem = _unencodable(row)
    if problem is not None:
        raise RecordError(file, line, *problem)
    return parse_row(row, file, line, columns, base_dir, require_target)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _first_surrogate(text: str) -> int | None:
    """Index of the first surrogate code point (text that cannot be written as UTF-8), or None."""
    found = _SURROGATE.search(text)
    return found.start() if found else None


def _unencodable(value: Any, path: str = "", depth: int = 0) -> tuple[str | None, str] | None:
    """(field, reason) for a part of a decoded row that could not be written back as UTF-8 JSON."""
    if depth > MAX_NESTING:
        return path or None, f"nested deeper than {MAX_NESTING} levels"
    if isinstance(value, str):
        if _first_surrogate(value) is not None:
            return path or None, "lone surrogate escape (e.g. \\ud800): not valid Unicode text"
    elif isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if _first_surrogate(str(key)) is not None:
                return path or None, "a key with a lone surrogate escape: not valid Unicode text"
            found = _unencodable(item, where, depth + 1)
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _unencodable(item, f"{path}[{index}]", depth + 1)
            if found:
                return found
    return None


DEFAULT_MAX_ROW_BYTES = 1 << 20  # a row names images and holds instructions: a few kB; 1 MiB is generous
MAX_EXTRA_FIELD_BYTES = 4096  # a field the format does not use is kept in the sample's json up to this size


class OversizedLine(str):
    """Stands for a line longer than the cap (its text is never held): :func:`parse_line` refuses it."""

    def __new__(cls, size: int, cap: int):
        line = super().__new__(cls, "")
        line.size, line.cap = size, cap
        return line


def iter_lines(
    file: str, storage_options: dict[str, Any] | None = None, max_bytes: int = DEFAULT_MAX_ROW_BYTES
) -> Iterator[tuple[int, str]]:
    """(0-based line number, text) for every non-blank line of a local or fsspec JSONL.

    Bytes that are not UTF-8 do not stop the file: they are kept as surrogate
    escapes, and :func:`parse_line` reports that line (file, line, column). A line
    over ``max_bytes`` is read through in blocks, never held: it comes as an
    :class:`OversizedLine` that :func:`parse_line` refuses.
    """
    import fsspec

    with fsspec.open(file, "rb", **options_for(file, storage_options)) as handle:
        for number, raw in enumerate(_bounded_lines(handle, max_bytes)):
            if isinstance(raw, int):
                yield number, OversizedLine(raw, max_bytes)
                continue
            text = raw.decode("utf-8", "surrogateescape")
            if text.strip():
                yield number, text


def _bounded_lines(handle, max_bytes: int, block_size: int = 1 << 20) -> Iterator[bytes | int]:
    """The lines of a binary file object (any fsspec file: ``readline`` there takes no size) read in blocks; a
    line longer than ``max_bytes`` is not kept: its size comes instead."""
    pending, skipped = b"", None  # the start of the current line, or the bytes of an oversized one so far
    while True:
        block = handle.read(block_size)
        if not block:
            if skipped is not None:
                yield skipped
            elif pending:
                yield pending
            return
        start = 0
        while True:
            end = block.find(b"\n", start)
            piece = block[start:] if end < 0 else block[start : end + 1]
            if skipped is not None:
                skipped += len(piece)
            else:
                pending += piece
                if len(pending) > max_bytes:
                    skipped, pending = len(pending), b""
            if end < 0:
                break
            if skipped is not None:
                yield skipped
            else:
                yield pending
            pending, skipped, start = b"", None, end + 1


def read_records(
    file: str, columns: Columns = Columns(), storage_options: dict[str, Any] | None = None
) -> Iterator[Record | RecordError]:
    """Every non-blank line of ``file`` as a Record, or the RecordError saying why not."""
    for number, text in iter_lines(file, storage_options):
        try:
            yield parse_line(text, file, number, columns)
        except RecordError as exc:
            yield exc
