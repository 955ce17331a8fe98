"""List a source's documents through fsspec and cut them into shards.

Listing is one glob call with details (sizes, ETags) rather than a stat per file, so it stays cheap on object
stores; the order is sorted so shard contents, and therefore part-file names, are the same on every run.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.core import url_to_fs
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
    """Return the files under the source's URL matching its glob, sorted, skipping dotfiles and the output."""
    fs, root = source_filesystem(source)
    pattern = posixpath.join(root, source.glob)
    fs.invalidate_cache(root)  # s3fs and friends cache listings per process: a scheduled run must see new objects
    found = fs.glob(pattern, detail=True)
    if not found and fs.isfile(root):
        found = {root: fs.info(root)}
    excluded = None
    if exclude_prefix and fsspec.core.split_protocol(exclude_prefix)[0] == fsspec.core.split_protocol(source.url)[0]:
        excluded = fsspec.core.strip_protocol(exclude_prefix).rstrip("/") + "/"
    refs = []
    for path, info in sorted(found.items()):
        if info.get("type") not in ("file", None):
            continue
        if any(part.startswith(".") for part in path[len(root) :].split("/") if part):
            continue
        if excluded and (path + "/").startswith(excluded):
            continue
        refs.append(DocumentRef(uri=fs.unstrip_protocol(path), path=path, size=info.get("size"), etag=_etag(info)))
    return refs


def cut_shards(refs: Sequence[DocumentRef], shard_size: int) -> list[Shard]:
    """Split the listing into consecutive shards of at most shard_size files."""
    return [Shard(i // shard_size, tuple(refs[i : i + shard_size])) for i in range(0, len(refs), shard_size)]


@task(name="discover-documents", retries=3, retry_delay_seconds=[1, 5, 20], cache_policy=NO_CACHE)
def discover_documents(spec: JobSpec) -> list[DocumentRef]:
    """List the source (retried: listing an object store can fail transiently)."""
    return list_documents(spec.source, exclude_prefix=spec.output.url)
