"""URI -> filesystem: local paths and ``s3://bucket/prefix`` through pyarrow, with atomic writes and backups.

Every path a user gives goes through :func:`resolve`. S3 honours the standard AWS variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
``AWS_PROFILE``) and ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` for MinIO, Ceph and other S3-compatible servers.
Without a region variable, a bucket's own region is asked for once, so buckets outside us-east-1 work too.
The filesystems are picklable, so Ray tasks get the driver's resolved endpoint and region; never its credentials:
every process, each Ray worker included, takes those from its own AWS credential chain.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import posixpath
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from email.utils import parsedate_to_datetime
from typing import Any, BinaryIO
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

__all__ = [
    "FileTooLargeError",
    "StorageError",
    "aws_settings",
    "backup",
    "create_new",
    "delete",
    "delete_dir",
    "exists",
    "get_object",
    "is_dir",
    "is_remote",
    "iter_files",
    "join",
    "list_files",
    "list_level",
    "open_input",
    "open_output",
    "read_bytes",
    "read_text",
    "read_versioned",
    "replace_if",
    "replacing",
    "resolve",
    "size",
    "write_bytes",
    "write_text",
]

_S3_SCHEMES = ("s3://", "s3a://")
_UMASK = os.umask(0o022)  # reading the umask means setting it; put it straight back
os.umask(_UMASK)
_SETTINGS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")  # not secrets
_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


class StorageError(OSError):
    """A storage operation failed; the message names the URI and the reason."""


class FileTooLargeError(StorageError):
    """A file is over the size limit of the read; ``size`` is its size in bytes."""

    def __init__(self, uri: str, size: int, limit: int):
        super().__init__(f"{uri}: {size:,} bytes, over the limit of {limit:,}")
        self.size = size


def is_remote(uri: str) -> bool:
    return str(uri).startswith(_S3_SCHEMES)


@functools.lru_cache(maxsize=256)
def _bucket_region(bucket: str, env: tuple) -> str | None:
    """The region a bucket lives in, from S3's ``x-amz-bucket-region`` header (sent even with a 301 or 403).

    ``env`` is the AWS environment boto3 reads; it is part of the cache key only.
    """
    import boto3
    from botocore.config import Config as BotoConfig

    client = boto3.client("s3", region_name="us-east-1",
                          config=BotoConfig(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}))
    try:
        response = client.head_bucket(Bucket=bucket)
    except client.exceptions.ClientError as exc:
        response = exc.response
    except Exception:  # offline or refused: pyarrow's default region applies and the real request names the error
        return None
    return response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")


@functools.lru_cache(maxsize=256)
def _s3_filesystem(bucket: str, env: tuple) -> pafs.S3FileSystem:
    values = dict(zip(_ENV, env))
    kwargs: dict = {}
    endpoint = values["AWS_ENDPOINT_URL_S3"] or values["AWS_ENDPOINT_URL"]
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme
    region = values["AWS_REGION"] or values["AWS_DEFAULT_REGION"] or _bucket_region(bucket, env)
    if region:
        kwargs["region"] = region
    # No keys: each process, a Ray worker on another node too, asks the AWS credential chain of its own (variables,
    # profile, IRSA, instance profile), which renews session tokens; pickled filesystems carry no secret.
    return pafs.S3FileSystem(**kwargs)


def aws_settings() -> dict[str, str]:
    """The driver's non-secret S3 settings (endpoint and region variables), for the ``runtime_env`` of Ray tasks that
    resolve URIs themselves, so they reach the same server. Credentials are never among them: a runtime_env is shown
    on the dashboard and frozen at submission, so workers take theirs from their own node's chain."""
    return {k: os.environ[k] for k in _SETTINGS if os.environ.get(k)}


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path or an ``s3://bucket/key`` URI.

    Local paths are made absolute; S3 paths lose their scheme, as pyarrow expects.
    """
    uri = str(uri)
    if is_remote(uri):
        path = uri.split("://", 1)[1].strip("/")
        if not path:
            raise StorageError(f"{uri}: an S3 URI needs a bucket, e.g. s3://bucket/prefix")
        return _s3_filesystem(path.split("/", 1)[0], tuple(os.environ.get(k) for k in _ENV)), path
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported scheme; use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def absolute(uri: str) -> str:
    """A local path made absolute, an ``s3://`` URI unchanged: what to hand to Ray workers, whose working folder
    is not the driver's."""
    uri = str(uri)
    return uri if is_remote(uri) else os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join relative path parts onto a URI, keeping its scheme. An absolute part is refused, not allowed to win."""
    uri = str(uri)
    for part in parts:
        if part.startswith(("/", "\\")) or "://" in part:
            raise StorageError(f"{part}: cannot join an absolute path onto {uri}; give a path relative to it")
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


def size(uri: str) -> int:
    """The file's size in bytes."""
    info = _info(uri)
    if info.type != pafs.FileType.File:
        raise StorageError(f"{uri}: file not found" if info.type == pafs.FileType.NotFound else f"{uri}: not a file")
    return info.size


def open_input(uri: str, seekable: bool = False) -> pa.NativeFile:
    """A readable stream over the file (use it as a context manager); ``seekable`` gives random access, for formats
    read from their end (Parquet: footer first, then ranges)."""
    fs, path = resolve(uri)
    try:
        return fs.open_input_file(path) if seekable else fs.open_input_stream(path)
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: file not found") from exc
    except OSError as exc:
        raise StorageError(f"{uri}: cannot read ({exc})") from exc


def read_bytes(uri: str) -> bytes:
    try:
        with open_input(uri) as f:
            return f.read()
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(f"{uri}: cannot read ({exc})") from exc


def get_object(uri: str, max_bytes: int, size: int = -1) -> bytes:
    """An ``s3://`` object's bytes with one request: a GET, with no HEAD before it (pyarrow's ``open_input_file``
    and ``open_input_stream`` both ask for the size first, doubling the requests of a bulk read).

    Args:
        max_bytes: the most bytes taken; a larger object is refused.
        size: the object's size as a listing gave it (-1: not known): over ``max_bytes``, it is refused with no
            request at all. Otherwise the GET's ``Content-Length`` is checked before the body is read, and the body
            is read to at most one byte past the limit.

    Raises:
        FileTooLargeError: over ``max_bytes``.
        FileNotFoundError: no such object.
        StorageError: any other failure.
    """
    if size > max_bytes:
        raise FileTooLargeError(uri, size, max_bytes)
    client, bucket, key = _s3_key(uri)
    try:
        got = client.get_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if getattr(exc, "response", {}).get("Error", {}).get("Code", "") in ("NoSuchKey", "404"):
            raise FileNotFoundError(f"{uri}: file not found") from exc
        raise StorageError(f"{uri}: cannot read ({type(exc).__name__}: {exc})") from exc
    with contextlib.closing(got["Body"]) as body:
        if got["ContentLength"] > max_bytes:
            raise FileTooLargeError(uri, got["ContentLength"], max_bytes)
        try:
            data = body.read(max_bytes + 1)
        except Exception as exc:
            raise StorageError(f"{uri}: cannot read ({type(exc).__name__}: {exc})") from exc
    if len(data) > max_bytes:
        raise FileTooLargeError(uri, len(data), max_bytes)
    return data


def read_text(uri: str) -> str:
    data = read_bytes(uri)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise StorageError(f"{uri}: not UTF-8 text (byte {exc.start})") from exc


@contextlib.contextmanager
def open_output(uri: str) -> Iterator[BinaryIO]:
    """Write a file by streaming into it; readers see the old file or the whole new one, never half of it.

    Locally the bytes go to a temporary file in the same folder, which is flushed to disk (fsync) and then renamed
    over the target. On S3 they go to a temporary key, copied over the target once complete: pyarrow completes an
    upload even when the writer fails (apache/arrow#40502), so the partial object is deleted instead of published.
    """
    fs, path = resolve(uri)
    try:
        if not isinstance(fs, pafs.LocalFileSystem):
            tmp = f"{posixpath.dirname(path)}/.tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}"
            try:
                with fs.open_output_stream(tmp) as f:
                    yield f
                fs.move(tmp, path)
            finally:
                with contextlib.suppress(OSError):
                    fs.delete_file(tmp)
            return
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
        try:
            # mkstemp makes the file owner-only; give it the mode a plain open() would (or keep the old one's)
            os.fchmod(fd, os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o666 & ~_UMASK)
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())  # the data is on disk before the name points at it
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(f"{uri}: cannot write ({exc})") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically (see :func:`open_output`)."""
    with open_output(uri) as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def _move(src: str, dst: str) -> None:
    fs, src_path = resolve(src)
    try:
        fs.move(src_path, resolve(dst)[1])
    except OSError as exc:
        raise StorageError(f"{src}: cannot move to {dst} ({exc})") from exc


def delete(uri: str) -> None:
    """Delete a file if it exists."""
    fs, path = resolve(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StorageError(f"{uri}: cannot delete ({exc})") from exc


def delete_dir(uri: str) -> None:
    """Delete a folder (an S3 prefix) and everything below it, if it exists."""
    fs, path = resolve(uri)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StorageError(f"{uri}: cannot delete ({exc})") from exc


@functools.lru_cache(maxsize=256)
def _s3_client(bucket: str, env: tuple) -> Any:
    """A boto3 client for a bucket (the same AWS variables as :func:`resolve`), one per process: clients are
    thread-safe, and each comes from its own session, as boto3's default session is not."""
    import boto3

    values = dict(zip(_ENV, env))
    endpoint = values["AWS_ENDPOINT_URL_S3"] or values["AWS_ENDPOINT_URL"]
    region = values["AWS_REGION"] or values["AWS_DEFAULT_REGION"] or _bucket_region(bucket, env)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region)


def _s3_key(uri: str) -> tuple[Any, str, str]:
    """The boto3 client for the URI's bucket, the bucket and the key."""
    bucket, _, key = resolve(uri)[1].partition("/")
    return _s3_client(bucket, tuple(os.environ.get(k) for k in _ENV)), bucket, key


def _condition_failed(exc: Exception) -> bool:
    """S3 refused a conditional request: 412, or 409 when a concurrent conditional write won the race."""
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404")


def _s3_conditional(uri: str, verb: str, request: Callable[[Any, str, str], Any]) -> Any:
    """``request(client, bucket, key)``; None where S3 refused its condition (or found no object), else its result.

    Raises:
        StorageError: any other failure, naming the object and what was being done.
    """
    client, bucket, key = _s3_key(uri)
    try:
        return request(client, bucket, key)
    except Exception as exc:
        if _condition_failed(exc):
            return None
        raise StorageError(f"{uri}: cannot {verb} ({type(exc).__name__}: {exc})") from exc


def _local_version(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_ino}:{st.st_mtime_ns}"


def create_new(uri: str, data: bytes) -> str | None:
    """Write a small file only if there is none: its version (see :func:`read_versioned`) if this call created it,
    None if something was there.

    On S3 one PutObject with ``If-None-Match: *``, decided by S3; locally ``open(O_CREAT | O_EXCL)``. A reader can
    see the local file empty for the moment between its creation and its one write.
    """
    if is_remote(uri):
        return _s3_conditional(uri, "create", lambda client, bucket, key: client.put_object(
            Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")["ETag"])
    path = resolve(uri)[1]
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return None
    except OSError as exc:
        raise StorageError(f"{uri}: cannot create ({exc})") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return _local_version(path)


def read_versioned(uri: str) -> tuple[bytes, str, float] | None:
    """``(content, version, age in seconds)`` of a small file, or None when there is none.

    The version is what :func:`replace_if` checks: S3's ETag, locally the inode and modification time. The age is
    measured by the storage's clock on S3 (its ``Date`` against ``Last-Modified``, to the second), so hosts whose
    clocks disagree still agree on it; locally by this host's clock.
    """
    if is_remote(uri):
        def get(client: Any, bucket: str, key: str) -> tuple[bytes, str, float]:
            got = client.get_object(Bucket=bucket, Key=key)
            now = parsedate_to_datetime(got["ResponseMetadata"]["HTTPHeaders"]["date"])
            return got["Body"].read(), got["ETag"], (now - got["LastModified"]).total_seconds()
        return _s3_conditional(uri, "read", get)
    path = resolve(uri)[1]
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            return f.read(), f"{st.st_ino}:{st.st_mtime_ns}", time.time() - st.st_mtime
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"{uri}: cannot read ({exc})") from exc


def replace_if(uri: str, data: bytes | None, version: str) -> str | None:
    """Overwrite a small file (or delete it, ``data=None``) only if it is still at ``version`` from
    :func:`read_versioned`: the new version ("" once deleted) if done, None if another writer changed or removed
    it first.

    On S3 a PutObject or DeleteObject with ``If-Match`` on the ETag. Locally the version is checked and the file
    replaced (renamed over) under an exclusive ``flock`` of ``<file>.lock``, which every local ``replace_if`` takes.
    """
    if is_remote(uri):
        if data is None:
            def delete(client: Any, bucket: str, key: str) -> str:
                client.delete_object(Bucket=bucket, Key=key, IfMatch=version)
                return ""
            return _s3_conditional(uri, "delete", delete)
        return _s3_conditional(uri, "replace", lambda client, bucket, key: client.put_object(
            Bucket=bucket, Key=key, Body=data, IfMatch=version)["ETag"])
    path = resolve(uri)[1]
    try:
        with open(f"{path}.lock", "a") as lock:  # one checker-and-writer at a time; the file itself is never absent
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if _local_version(path) != version:
                    return None
            except FileNotFoundError:
                return None
            if data is None:
                os.unlink(path)
                return ""
            with open_output(uri) as f:  # a rename over it: readers see the old file or the new one
                f.write(data)
            return _local_version(path)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot replace ({exc})") from exc


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
    _move(uri, target)
    return target


@contextlib.contextmanager
def replacing(targets: Sequence[str]) -> Iterator[dict[str, str]]:
    """Replace several files together: every file or none, and each old one kept as a numbered ``.bak``.

    Yields ``{target: staging URI}``; write each new file's whole content to its staging URI inside the block.
    If anything fails while they are written, the staging files are removed and no target is touched. Only when
    all are written are the old files backed up and the new ones moved into place; if one of those moves fails,
    the ones already done are undone, so a dataset never holds a new ``train.txt`` beside an old ``val.txt``.
    A target whose new content equals its old one is left as it is.
    """
    staged = {t: join(posixpath.dirname(t) if is_remote(t) else os.path.dirname(t),
                      f".{posixpath.basename(t)}.partial") for t in targets}
    try:
        yield staged
        done: list[tuple[str, str | None]] = []
        try:
            for target, new in staged.items():
                if _same_content(new, target):
                    continue  # a repeated run: nothing to replace, and no backup piled up
                done.append((target, backup(target)))
                _move(new, target)
        except Exception as exc:
            _undo(done)
            raise StorageError(f"{exc}; every file was put back as it was") from exc
    finally:
        for new in staged.values():
            with contextlib.suppress(StorageError):
                delete(new)


def _same_content(a: str, b: str, chunk: int = 8 << 20) -> bool:
    if not exists(b) or size(a) != size(b):
        return False
    with open_input(a) as fa, open_input(b) as fb:
        while True:
            block = fa.read(chunk)
            if block != fb.read(chunk):
                return False
            if not block:
                return True


def _undo(done: list[tuple[str, str | None]]) -> None:
    for target, old in reversed(done):
        delete(target)
        if old is not None:
            _move(old, target)


def list_files(uri: str) -> list[str]:
    """All files below a folder, recursively, as paths relative to it (forward slashes), sorted."""
    fs, root = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"{uri}: cannot list ({exc})") from exc
    root = root.rstrip("/") + "/"
    return sorted(i.path[len(root):].replace(os.sep, "/") for i in infos if i.type == pafs.FileType.File)


def _walk_local(root: str) -> Iterator[str]:
    """Files below a local folder, depth first, each folder's entries in name order; symlinked folders are not
    entered (a link cycle cannot loop), symlinked files are listed."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise StorageError(f"{root}: cannot list ({exc})") from exc
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_local(entry.path)
        elif entry.is_file():
            yield entry.path


def list_level(uri: str, token: str | None = None, max_keys: int = 1000
               ) -> tuple[list[str], list[int], list[str], str | None]:
    """One page (up to ``max_keys`` entries; S3 gives 1,000 at most) of an ``s3://`` prefix listed one level deep
    (``Delimiter="/"``).

    Args:
        uri: the prefix, taken exactly as given (a sub-prefix this returned may end in ``//``); a trailing ``/``
            is implied.
        token: the continuation token of the page before, or None for the first.

    Returns:
        ``(keys, sizes, folders, token)``: the page's objects directly below the prefix (full URIs, in key order,
        folder markers left out) and their sizes, its sub-prefixes (full URIs ending in ``/``, in key order), and
        the token of the next page (None after the last).
    """
    bucket, _, prefix = uri.split("://", 1)[1].partition("/")  # exactly: a sub-prefix may end in `//`
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    client = _s3_client(bucket, tuple(os.environ.get(k) for k in _ENV))
    kwargs = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", "MaxKeys": max_keys,
              **({"ContinuationToken": token} if token else {})}
    try:
        page = client.list_objects_v2(**kwargs)
    except Exception as exc:
        raise StorageError(f"{uri}: cannot list ({type(exc).__name__}: {exc})") from exc
    items = [i for i in page.get("Contents", ()) if not i["Key"].endswith("/")]
    return ([f"s3://{bucket}/{i['Key']}" for i in items], [i["Size"] for i in items],
            [f"s3://{bucket}/{p['Prefix']}" for p in page.get("CommonPrefixes", ())],
            page.get("NextContinuationToken") if page.get("IsTruncated") else None)


def iter_files(uri: str) -> Iterator[str]:
    """Every file below a folder or prefix, recursively, as full URIs (absolute paths locally), streamed: memory
    stays flat whatever the count. Order is stable between runs: by name locally, S3's key order on S3.

    S3 is listed with boto3's paginator (1,000 keys a request), which honours the same AWS variables as
    :func:`resolve`; pyarrow has no streaming listing.
    """
    if not is_remote(uri):
        yield from _walk_local(os.path.abspath(os.path.expanduser(uri)))
        return
    client, bucket, prefix = _s3_key(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                if not item["Key"].endswith("/"):  # folder markers some tools write
                    yield f"s3://{bucket}/{item['Key']}"
    except Exception as exc:  # botocore's ClientError, EndpointConnectionError, NoCredentialsError, ...
        raise StorageError(f"{uri}: cannot list ({type(exc).__name__}: {exc})") from exc
