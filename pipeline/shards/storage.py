"""Local paths and object storage behind one small API, with atomic writes.

Credentials and endpoints come from where users already configure them: the
``AWS_*`` environment (``AWS_ENDPOINT_URL`` included, read by botocore),
``STORAGE_EMULATOR_HOST`` and ``GOOGLE_APPLICATION_CREDENTIALS`` for GCS, fsspec's
``FSSPEC_S3_*`` / ``FSSPEC_GCS_*`` variables, and an optional
``--storage_options`` JSON.  Writes never leave a partial object a reader could
take as complete: local files go through a temporary name and ``os.replace``;
object stores publish an object only when its (single or multipart) upload
completes.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from pipeline.errors import UserError
from pipeline.files import atomic_write, fsync_dir, fsync_file

LOCAL_PROTOCOLS = {"file", "local"}
GCS_PROTOCOLS = {"gs", "gcs"}


def parse_storage_options(text: str | None, for_url: str | None = None) -> dict[str, Any]:
    """Parse ``--storage_options``: per protocol (``{"s3": {...}}``) or flat (``{...}``).

    Flat options are meant for the store the command writes or reads (``for_url``):
    they become that protocol's options, so an S3 ``endpoint_url`` never reaches
    ``http(s)`` image fetches.  Without a remote ``for_url`` they go to every
    remote protocol.
    """
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--storage_options is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UserError("--storage_options must be a JSON object")
    if value and not _is_per_protocol(value) and for_url and protocol_of(for_url) not in LOCAL_PROTOCOLS:
        return {protocol_of(for_url): value}
    return value


def _is_per_protocol(options: dict[str, Any]) -> bool:
    return any(isinstance(v, dict) and k in fsspec.available_protocols() for k, v in options.items())


def has_scheme(ref: str) -> bool:
    """True for URLs such as ``s3://b/k``, ``https://h/p`` or ``file:///x``."""
    head, sep, _ = ref.partition("://")
    return bool(sep) and head.replace("+", "").replace("-", "").replace(".", "").isalnum()


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if has_scheme(url) else "file"


def options_for(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The options that apply to ``url``: its protocol's entry, or the flat options for remote URLs."""
    if not storage_options:
        return {}
    protocol = protocol_of(url)
    if _is_per_protocol(storage_options):
        options = dict(storage_options.get(protocol, {}))
    else:
        options = {} if protocol in LOCAL_PROTOCOLS else dict(storage_options)
    if protocol in GCS_PROTOCOLS:
        route_gcs(options)
    return options


def gcs_endpoint(options: dict[str, Any]) -> str | None:
    """A GCS endpoint other than Google's: ``endpoint_url`` (options or ``FSSPEC_GCS_ENDPOINT_URL``) or
    ``STORAGE_EMULATOR_HOST``."""
    for source in (options, fsspec.config.conf.get("gs", {}), fsspec.config.conf.get("gcs", {})):
        if source.get("endpoint_url"):
            return source["endpoint_url"]
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    return host if host not in ("", "default") else None


def route_gcs(options: dict[str, Any]) -> None:
    """With a non-Google endpoint, serve ``gs://`` by gcsfs's JSON-API client.

    gcsfs's default client first asks each bucket's type over gRPC (TLS) from the
    Storage Control API, which emulators and GCS-compatible stores do not serve:
    against a plain-HTTP endpoint with ``token="anon"`` that probe fails only
    after 60 s, and again on every call, and it starts gRPC state that forked
    DataLoader workers inherit.  The JSON API is all such an endpoint speaks.
    Google's own endpoint keeps gcsfs's default.
    """
    if gcs_endpoint(options) is None:
        return
    from gcsfs.core import GCSFileSystem

    for protocol in GCS_PROTOCOLS:
        if fsspec.get_filesystem_class(protocol) is not GCSFileSystem:
            fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)


def join(base: str, *parts: str) -> str:
    """Join URL or path segments with ``/``."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


class Store:
    """One root (a local folder or an fsspec URL) with the operations the pipeline needs."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        self.root = root.rstrip("/") if root not in ("/",) else root
        self.options = options_for(root, storage_options)
        self.fs, self.root_path = url_to_fs(self.root, **self.options)
        self.local = protocol_of(root) in LOCAL_PROTOCOLS

    def url(self, rel: str) -> str:
        return join(self.root, rel)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root_path, rel) if rel else self.root_path

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel).decode("utf-8"))

    def listdir(self, rel: str) -> list[str]:
        """Names directly under ``rel`` (empty when it does not exist)."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def folders_and_files(self, rel: str) -> tuple[list[str], list[str]]:
        """(sub-folder names, file names) directly under ``rel``; both empty when it does not exist."""
        try:
            entries = self.fs.ls(self.path(rel), detail=True, refresh=True)
        except FileNotFoundError:
            return [], []
        folders, files = [], []
        for entry in entries:
            name = posixpath.basename(entry["name"].rstrip("/"))
            (folders if entry.get("type") == "directory" else files).append(name)
        return sorted(folders), sorted(files)

    def delete(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Publish ``data`` at ``rel`` atomically."""
        target = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            atomic_write(target, data)
        else:
            self.fs.pipe_file(target, data)

    def write_json(self, rel: str, value: Any) -> None:
        self.write_bytes(rel, json.dumps(value, ensure_ascii=False, indent=1).encode("utf-8"))

    def put_file(self, local_file: str, rel: str) -> None:
        """Upload (or move, for a local root) a finished local file to ``rel`` atomically."""
        target = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex}"
            os.replace(local_file, tmp) if _same_device(local_file, target) else _copy(local_file, tmp)
            fsync_file(tmp)  # on disk before the name (and then the commit record) says it is there
            os.replace(tmp, target)
            fsync_dir(os.path.dirname(target))
        else:
            self.fs.put_file(local_file, target)


def _same_device(a: str, b: str) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(os.path.dirname(b)).st_dev
    except OSError:
        return False


def _copy(src: str, dst: str) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(1 << 22):
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())


def uri_exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``url`` exists; an unreachable store counts as absent (the caller reports what is missing)."""
    try:
        fs, path = url_to_fs(url, **options_for(url, storage_options))
        return fs.exists(path)
    except Exception:
        return False


class TooLarge(ValueError):
    """Content over the byte limit a reader set."""


def read_uri(
    uri: str, storage_options: dict[str, Any] | None = None, max_bytes: int | None = None, timeout: float | None = None
) -> bytes:
    """Whole content of a local path or any fsspec URL (http(s), s3, gs ...).

    ``max_bytes`` bounds the read: a known size above it is refused before
    reading, an unknown one (a stream, ``/dev/zero``) after ``max_bytes + 1``
    bytes.  ``timeout`` (seconds) bounds connecting and waiting for data over
    http(s) and S3 unless the storage options set their own.
    """
    options = options_for(uri, storage_options)
    if timeout:
        options = with_timeout(protocol_of(uri), options, timeout)
    with fsspec.open(uri, "rb", **options) as handle:
        if max_bytes is None:
            return handle.read()
        size = getattr(handle, "size", None)
        if isinstance(size, int) and size > max_bytes:
            raise TooLarge(f"{size} bytes > limit {max_bytes}")
        data = handle.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise TooLarge(f"more than the limit of {max_bytes} bytes")
        return data


def with_timeout(protocol: str, options: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Options that bound connecting and waiting for data (http(s), S3) unless the user set their own."""
    options = dict(options)
    if protocol in ("http", "https") and "client_kwargs" not in options:
        import aiohttp

        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 30))}
    elif protocol in ("s3", "s3a"):
        config = dict(options.get("config_kwargs", {}))
        config.setdefault("connect_timeout", min(timeout, 30))
        config.setdefault("read_timeout", timeout)
        options["config_kwargs"] = config
    return options
