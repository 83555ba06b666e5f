"""URI -> filesystem: local paths and ``s3://bucket/prefix`` through pyarrow, with atomic writes and backups.

Every path a user gives goes through :func:`resolve`. S3 honours the standard AWS variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
``AWS_PROFILE``) and ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` for MinIO, Ceph and other S3-compatible servers.
The filesystems are picklable, so Ray tasks get the driver's resolved settings.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from urllib.parse import urlparse

import pyarrow.fs as pafs

__all__ = [
    "StorageError",
    "backup",
    "exists",
    "is_dir",
    "is_remote",
    "join",
    "list_files",
    "read_bytes",
    "read_text",
    "resolve",
    "write_bytes",
    "write_text",
]

_S3_SCHEMES = ("s3://", "s3a://")
_UMASK = os.umask(0o022)  # reading the umask means setting it; put it straight back
os.umask(_UMASK)


class StorageError(OSError):
    """A storage operation failed; the message names the URI and the reason."""


def is_remote(uri: str) -> bool:
    return str(uri).startswith(_S3_SCHEMES)


def _s3_filesystem() -> pafs.S3FileSystem:
    kwargs: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    # Explicit keys travel with the pickled filesystem, so Ray workers on other nodes need no env of their own.
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path or an ``s3://bucket/key`` URI.

    Local paths are made absolute; S3 paths lose their scheme, as pyarrow expects.
    """
    uri = str(uri)
    if is_remote(uri):
        path = uri.split("://", 1)[1].strip("/")
        if not path:
            raise StorageError(f"{uri}: an S3 URI needs a bucket, e.g. s3://bucket/prefix")
        return _s3_filesystem(), path
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported scheme; use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its scheme."""
    uri = str(uri)
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def _info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot reach storage ({exc})") from exc


def exists(uri: str) -> bool:
    return _info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return _info(uri).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: file not found") from exc
    except OSError as exc:
        raise StorageError(f"{uri}: cannot read ({exc})") from exc


def read_text(uri: str) -> str:
    data = read_bytes(uri)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise StorageError(f"{uri}: not UTF-8 text (byte {exc.start})") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically: readers see the old file or the new one, never half of it.

    Locally the bytes go to a temporary file in the same folder, then ``os.replace``. On S3 a single PUT of the
    complete buffer is atomic by nature.
    """
    fs, path = resolve(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
            try:
                # mkstemp makes the file owner-only; give it the mode a plain open() would (or keep the old one's)
                os.fchmod(fd, os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o666 & ~_UMASK)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot write ({exc})") from exc


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def backup(uri: str) -> str | None:
    """Move an existing file aside to ``<name>.bak`` (then ``.bak.1``, ``.bak.2``, ...); never overwrite a backup.

    Returns the backup's URI, or None when there was nothing to back up.
    """
    if not exists(uri):
        return None
    target, n = f"{uri}.bak", 0
    while exists(target):
        n += 1
        target = f"{uri}.bak.{n}"
    fs, src = resolve(uri)
    try:
        fs.move(src, resolve(target)[1])
    except OSError as exc:
        raise StorageError(f"{uri}: cannot move to {target} ({exc})") from exc
    return target


def list_files(uri: str) -> list[str]:
    """All files below a folder, recursively, as paths relative to it (forward slashes), sorted."""
    fs, root = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"{uri}: cannot list ({exc})") from exc
    root = root.rstrip("/") + "/"
    return sorted(i.path[len(root):].replace(os.sep, "/") for i in infos if i.type == pafs.FileType.File)
