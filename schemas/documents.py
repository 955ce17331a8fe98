"""The documents of a source as every layer sees them: a listed file, a shard of files, and a listing's Arrow schema.

Discovery (tasks/ingest/discover.py) produces listings; state, plan and the shard task consume them. The types
live here, below all of them, so storage code never imports the discovery code that fills them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa


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
