"""List a source's documents through fsspec and cut them into shards.

Listing is one glob call with details (sizes, ETags) rather than a stat per file, so it stays cheap on object
stores; the order is sorted so shard contents, and therefore part-file names, are the same on every run.

A file's ETag is what tells a run that it changed. Object stores list a content ETag; other filesystems (a local
folder, SFTP…) give only modification time and size, which miss an edit that keeps both (rsync -t, sync tools
that restore mtimes). `source.change_detection: content` gives those files a hash of their bytes instead, computed
here, folder by folder, on a few threads.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import posixpath
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
from fsspec.asyn import AsyncFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import glob_translate
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from docroute.schemas.documents import LISTING_SCHEMA, DocumentRef, refs_of
from docroute.schemas.errors import SourceError
from docroute.schemas.spec import JobSpec, SourceSpec


class SourceNotFoundError(SourceError, FileNotFoundError):
    """The source's folder, file or bucket does not exist: a typo or an unmounted disk, never "no documents"."""


class SourceUnavailableError(SourceError, OSError):
    """The source exists but could not be listed (no permission, the store unreachable after retries)."""


OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "r2"})
"""Where a prefix is only a name: it exists once an object is under it, so an empty one is an empty listing."""


def _check_source_exists(source: SourceSpec, fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Refuse a source that is not there, rather than list it as empty and report success with zero documents."""
    if fs.exists(root):
        return
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & OBJECT_STORES:
        bucket = root.strip("/").split("/", 1)[0]
        if bucket != root.strip("/") and fs.exists(bucket):
            return  # an empty prefix of a bucket that exists
        raise SourceNotFoundError(f"source {source.url}: the bucket {bucket!r} does not exist or is not visible")
    raise SourceNotFoundError(f"source {source.url} does not exist")


def source_filesystem(source: SourceSpec) -> tuple[fsspec.AbstractFileSystem, str]:
    """Open the source's filesystem; returns it with the root path in that filesystem's terms."""
    fs, root = url_to_fs(source.url, **source.fsspec_options())
    return fs, root.rstrip("/") or "/"


def _listed_etag(info: dict[str, Any]) -> str | None:
    """The ETag or checksum the listing gives, which changes whenever the content does."""
    for key in ("ETag", "etag", "md5Hash", "checksum"):
        if info.get(key):
            return str(info[key]).strip('"')
    return None


def _etag(info: dict[str, Any]) -> str | None:
    listed = _listed_etag(info)
    if listed is not None:
        return listed
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    return f"mtime:{mtime}:{info.get('size')}" if mtime is not None else None


HASH_WORKERS = 8
"""Files hashed at once (change_detection: content): enough to keep a disk or a network busy, few enough threads."""

Found = list[tuple[str, dict[str, Any]]]
"""One folder's matching files: (path, info dict from the listing)."""


def _sha256_of(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The file's content hash, streamed in blocks (bounded memory); None when it vanished or cannot be read.

    A file that disappeared or is unreadable keeps its metadata ETag: reading it fails the same way and becomes
    that file's error row. Any other error (a network failure) propagates, so the listing task retries.
    """
    try:
        if isinstance(fs, LocalFileSystem):
            with open(path, "rb") as handle:  # noqa: PTH123 - fsspec's opener costs more than a small file's hash
                return hashlib.file_digest(handle, "sha256").hexdigest()
        with fs.open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
        return None


def _in_order(
    pool: ThreadPoolExecutor, work: Callable[[str], str | None], items: Iterable[str]
) -> Iterator[str | None]:
    """pool.map with a bounded window: a folder of a million files must not queue a million futures at once."""
    pending: deque[Future[str | None]] = deque()
    for item in items:
        pending.append(pool.submit(work, item))
        if len(pending) >= 4 * HASH_WORKERS:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@contextlib.contextmanager
def _etagger(source: SourceSpec, fs: fsspec.AbstractFileSystem) -> Iterator[Callable[[Found], list[str | None]]]:
    """How one folder's files get their ETags, for the source's change_detection; owns the hashing threads."""
    if source.change_detection == "metadata":
        yield lambda found: [_etag(info) for _, info in found]
        return
    # threads where the filesystem is safe to share across them (a local disk, async object stores); one
    # connection filesystems (FTP, SFTP) read one file at a time
    workers = HASH_WORKERS if isinstance(fs, LocalFileSystem | AsyncFileSystem) else 1
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="docroute-hash") as pool:

        def etags(found: Found) -> list[str | None]:
            result = [_etag(info) for _, info in found]
            # files over max_bytes become error rows whatever they hold, so their (metadata) ETag is enough; once
            # they shrink or max_bytes grows they are hashed, the ETag changes and they are read again
            todo = [
                i
                for i, (_, info) in enumerate(found)
                if _listed_etag(info) is None and (info.get("size") is None or info["size"] <= source.max_bytes)
            ]
            hashes = _in_order(pool, lambda path: _sha256_of(fs, path), (found[i][0] for i in todo))
            for i, digest in zip(todo, hashes, strict=True):
                if digest is not None:
                    result[i] = f"sha256:{digest}"
            return result

        yield etags


def list_documents(source: SourceSpec, *, exclude_prefix: str | None = None) -> list[DocumentRef]:
    """Return the files under the source's URL matching its glob, in walk order, skipping dotfiles and the output."""
    return list(refs_of(list_source(source, exclude_prefix=exclude_prefix)))


def iter_listing(source: SourceSpec, *, exclude_prefix: str | None = None) -> Iterator[pa.Table]:
    """The source's listing, one table (see LISTING_SCHEMA) per folder, in name order, without dotfiles and the output.

    Walks one directory (prefix) at a time and keeps a few strings per file, rather than asking for every file's
    info dict at once: a bucket of a million objects must not need gigabytes to list. Matching uses fsspec's own
    glob translation, so `glob` means what it means to `fs.glob`. With `change_detection: content`, each folder's
    files are hashed before its table is yielded, at most a few dozen at a time.
    """
    fs, root = source_filesystem(source)
    fs.invalidate_cache(root)  # s3fs and friends cache listings per process: a scheduled run must see new objects
    try:
        _check_source_exists(source, fs, root)
        with _etagger(source, fs) as etags:
            yield from _walk(source, fs, root, etags, exclude_prefix)
    except SourceError:
        raise
    except OSError as exc:  # s3fs and fsspec translate store failures to OSError subclasses
        raise SourceUnavailableError(f"cannot list source {source.url}: {type(exc).__name__}: {exc}") from exc


def _walk(
    source: SourceSpec,
    fs: fsspec.AbstractFileSystem,
    root: str,
    etags: Callable[[Found], list[str | None]],
    exclude_prefix: str | None,
) -> Iterator[pa.Table]:
    """The walk behind iter_listing, apart from it so that the hashing threads live exactly as long as the walk."""
    if fs.isfile(root):
        found = [(root, fs.info(root))]
        yield _table(found, fs, etags(found))
        return
    # the folder's own name is literal: "docs[1]" is a folder, not a pattern
    matches = re.compile(glob_translate(posixpath.join(glob.escape(root), source.glob))).match
    excluded = None
    if exclude_prefix and fsspec.core.split_protocol(exclude_prefix)[0] == fsspec.core.split_protocol(source.url)[0]:
        excluded = fsspec.core.strip_protocol(exclude_prefix).rstrip("/")
    for directory, subdirs, files in fs.walk(root, detail=True):
        # dot-folders and the job's own output are never documents; the rest is walked in name order, so the
        # listing (hence shard contents and part names) is the same on every run without sorting it whole
        visit = sorted(
            (n, info)
            for n, info in subdirs.items()
            if not n.startswith(".") and posixpath.join(directory, n) != excluded
        )
        subdirs.clear()
        subdirs.update(visit)
        chosen = [
            (info.get("name", posixpath.join(directory, name)), info)
            for name, info in sorted(files.items())
            if not name.startswith(".") and info.get("type") in ("file", None)
        ]
        chosen = [(path, info) for path, info in chosen if matches(path)]
        if chosen:
            yield _table(chosen, fs, etags(chosen))
        fs.invalidate_cache(directory)  # drop the cached listing dicts (kilobytes per file) once read


def list_source(source: SourceSpec, *, exclude_prefix: str | None = None) -> pa.Table:
    """The whole listing as one table (one chunk per folder)."""
    tables = list(iter_listing(source, exclude_prefix=exclude_prefix))
    return pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()


def _table(found: Found, fs: fsspec.AbstractFileSystem, etags: list[str | None]) -> pa.Table:
    return pa.table(
        {
            "uri": [fs.unstrip_protocol(path) for path, _ in found],
            "path": [path for path, _ in found],
            "size": [info.get("size") for _, info in found],
            "etag": etags,
        },
        schema=LISTING_SCHEMA,
    )


def _worth_retrying(_task: object, _task_run: object, state: State[Any]) -> bool:
    """A source that does not exist will not appear in 26 seconds: fail at once; retry everything else."""
    return not isinstance(state.data, SourceNotFoundError)


@task(
    name="discover-documents",
    retries=3,
    retry_delay_seconds=[1, 5, 20],
    retry_condition_fn=_worth_retrying,
    cache_policy=NO_CACHE,
)
def discover_documents(spec: JobSpec, spill_path: str) -> int:
    """List the source into a local Arrow file, folder by folder; returns the number of files.

    Retried (listing an object store can fail transiently). The listing goes to disk, not into the return value:
    a bucket of millions of files must not need memory in proportion.
    """
    from docroute.tasks.store.spill import RowSpill

    spill = RowSpill(Path(spill_path), LISTING_SCHEMA)
    try:
        for table in iter_listing(spec.source, exclude_prefix=spec.output.url):
            spill.add(table)
    finally:
        spill.close()
    return spill.rows
