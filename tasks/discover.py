"""List a source's documents through fsspec and cut them into shards.

Listing is one glob call with details (sizes, ETags) rather than a stat per file, so it stays cheap on object
stores; the order is sorted so shard contents, and therefore part-file names, are the same on every run.
"""

from __future__ import annotations

import glob
import posixpath
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
from fsspec.core import url_to_fs
from fsspec.utils import glob_translate
from prefect import task
from prefect.cache_policies import NO_CACHE

from docroute.schemas.spec import JobSpec, SourceSpec


@dataclass(frozen=True, slots=True)
class DocumentRef:
    """One listed file: its full URI and what the listing said about it."""

    uri: str
    path: str  # the same location in the filesystem's own terms (no protocol), for batched reads
    size: int | None
    etag: str | None


@dataclass(frozen=True, slots=True)
class Shard:
    """A slice of the source processed by one task run."""

    index: int
    refs: tuple[DocumentRef, ...]
    resume: bool = False  # an interrupted run may have written this shard's part already (tasks/plan.py)

    @property
    def size(self) -> int:
        return len(self.refs)


def source_filesystem(source: SourceSpec) -> tuple[fsspec.AbstractFileSystem, str]:
    """Open the source's filesystem; returns it with the root path in that filesystem's terms."""
    fs, root = url_to_fs(source.url, **source.fsspec_options())
    return fs, root.rstrip("/") or "/"


def _etag(info: dict[str, Any]) -> str | None:
    for key in ("ETag", "etag", "md5Hash", "checksum"):
        if info.get(key):
            return str(info[key]).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    return f"mtime:{mtime}:{info.get('size')}" if mtime is not None else None


def list_documents(source: SourceSpec, *, exclude_prefix: str | None = None) -> list[DocumentRef]:
    """Return the files under the source's URL matching its glob, in walk order, skipping dotfiles and the output."""
    return list(refs_of(list_source(source, exclude_prefix=exclude_prefix)))


def iter_listing(source: SourceSpec, *, exclude_prefix: str | None = None) -> Iterator[pa.Table]:
    """The source's listing, one table (see LISTING_SCHEMA) per folder, in name order, without dotfiles and the output.

    Walks one directory (prefix) at a time and keeps a few strings per file, rather than asking for every file's
    info dict at once: a bucket of a million objects must not need gigabytes to list. Matching uses fsspec's own
    glob translation, so `glob` means what it means to `fs.glob`.
    """
    fs, root = source_filesystem(source)
    fs.invalidate_cache(root)  # s3fs and friends cache listings per process: a scheduled run must see new objects
    if fs.isfile(root):
        yield _table([(root, fs.info(root))], fs)
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
            yield _table(chosen, fs)
        fs.invalidate_cache(directory)  # drop the cached listing dicts (kilobytes per file) once read


def list_source(source: SourceSpec, *, exclude_prefix: str | None = None) -> pa.Table:
    """The whole listing as one table (one chunk per folder)."""
    tables = list(iter_listing(source, exclude_prefix=exclude_prefix))
    return pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()


def _table(found: list[tuple[str, dict[str, Any]]], fs: fsspec.AbstractFileSystem) -> pa.Table:
    return pa.table(
        {
            "uri": [fs.unstrip_protocol(path) for path, _ in found],
            "path": [path for path, _ in found],
            "size": [info.get("size") for _, info in found],
            "etag": [_etag(info) for _, info in found],
        },
        schema=LISTING_SCHEMA,
    )


LISTING_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string()),
        pa.field("path", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("etag", pa.string()),
    ]
)
"""A listing as one Arrow table: a few dozen bytes per file, where a list of Python objects costs kilobytes."""


def refs_of(table: pa.Table) -> tuple[DocumentRef, ...]:
    """The refs of a (small) slice of a listing, e.g. one shard's."""
    columns = [table[name].to_pylist() for name in LISTING_SCHEMA.names]
    return tuple(DocumentRef(uri, path, size, etag) for uri, path, size, etag in zip(*columns, strict=True))


def cut_shards(refs: Sequence[DocumentRef], shard_size: int) -> list[Shard]:
    """Split the listing into consecutive shards of at most shard_size files."""
    return [Shard(i // shard_size, tuple(refs[i : i + shard_size])) for i in range(0, len(refs), shard_size)]


@task(name="discover-documents", retries=3, retry_delay_seconds=[1, 5, 20], cache_policy=NO_CACHE)
def discover_documents(spec: JobSpec, spill_path: str) -> int:
    """List the source into a local Arrow file, folder by folder; returns the number of files.

    Retried (listing an object store can fail transiently). The listing goes to disk, not into the return value:
    a bucket of millions of files must not need memory in proportion.
    """
    from docroute.tasks.spill import RowSpill

    spill = RowSpill(Path(spill_path), LISTING_SCHEMA)
    try:
        for table in iter_listing(spec.source, exclude_prefix=spec.output.url):
            spill.add(table)
    finally:
        spill.close()
    return spill.rows
