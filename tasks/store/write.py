"""Write Parquet and JSON files to the output through fsspec, atomically where the filesystem allows.

Part files are named by run and shard, so a retried shard overwrites its own part instead of adding a second one.
On a local disk a file is written under a temporary name and renamed; an object store's PUT is already atomic.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from docroute.schemas.errors import StorageError
from docroute.schemas.spec import OutputSpec


class OutputWriteError(StorageError, OSError):
    """A file of the output could not be written (no permission, a full disk, the store unreachable); still an
    OSError, so code that caught those catches it."""


@contextlib.contextmanager
def _writing(url: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        raise OutputWriteError(f"cannot write {url}: {type(exc).__name__}: {exc}") from exc


def atomic_write(output: OutputSpec, url: str, write: Callable[[IO[bytes]], None]) -> None:
    """Stream into the file: under a temporary name then renamed on a local disk; object stores publish an object
    only when its upload completes (one PUT, or the multipart upload's completion), so readers never see half."""
    fs, path = url_to_fs(url, **output.fsspec_options())
    with _writing(url):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            temporary = f"{posixpath.dirname(path)}/.{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp"
            try:
                with fs.open(temporary, "wb") as handle:
                    write(handle)
                fs.mv(temporary, path)
            finally:
                if fs.exists(temporary):
                    fs.rm(temporary)
        else:
            with fs.open(path, "wb") as handle:
                write(handle)


def create_exclusive(output: OutputSpec, url: str, data: bytes) -> bool:
    """Create the file with `data` only if nothing is there yet; True when this call created it.

    This is what makes one run per output a guarantee rather than a convention (tasks/store/lease.py): of two writers
    racing for one name exactly one wins. A local disk gets the whole file under a temporary name and then a hard
    link to the final name, which the kernel refuses when the name exists (so a reader never sees half a file);
    S3 gets a conditional PUT (`If-None-Match: *`, s3fs's `mode="create"`), which S3 and moto enforce. Other fsspec
    stores get their own `mode="create"` where they implement it.
    """
    with _writing(url):
        return _create_exclusive(output, url, data)


def _create_exclusive(output: OutputSpec, url: str, data: bytes) -> bool:
    fs, path = url_to_fs(url, **output.fsspec_options())
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        temporary = f"{posixpath.dirname(path)}/.{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp"
        staged = Path(temporary)
        with staged.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            Path(path).hardlink_to(staged)
        except FileExistsError:
            return False
        finally:
            staged.unlink()
        return True
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    except OSError as exc:  # a store that reports the failed precondition without naming it (412 / 409 conflict)
        text = str(exc)
        if any(marker in text for marker in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")):
            return False
        raise
    return True


def write_parquet(
    output: OutputSpec, url: str, table: pa.Table, *, dictionary: bool | list[str] = True, row_group_rows: int = 65_536
) -> None:
    """Write one Parquet file straight to storage (no in-memory copy of the file); compression from the spec.

    `dictionary` lists the columns to dictionary-encode when most values are unique (ids, URIs): building a
    dictionary for them costs a hash table the size of the column before Parquet gives up on it. Row groups of
    `row_group_rows` bound the writer's buffers.
    """
    compression = None if output.compression == "none" else output.compression
    options: dict[str, Any] = {
        "compression": compression,
        "use_dictionary": dictionary,
        "row_group_size": row_group_rows,
    }
    fs, path = url_to_fs(url, **output.fsspec_options())
    if isinstance(fs, LocalFileSystem):
        with _writing(url):
            _write_local_parquet(path, table, options)
        return

    def write(handle: IO[bytes]) -> None:
        pq.write_table(table, handle, **options)

    atomic_write(output, url, write)


def _write_local_parquet(path: str, table: pa.Table, options: dict[str, Any]) -> None:
    """`atomic_write` on a local disk, with Arrow's own file writer: under a temporary name, then renamed.

    Handing Arrow a Python file object (fsspec's local opener) makes it call back into Python for every buffer it
    writes; Arrow writing the path itself does none of that, which matters when every shard writes a part.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    try:
        with pa.OSFile(str(temporary), "wb") as sink:  # a native file: the path is never parsed as a URI
            pq.write_table(table, sink, **options)
        temporary.replace(final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def part_exists(output: OutputSpec, url: str) -> bool:
    fs, path = url_to_fs(url, **output.fsspec_options())
    return bool(fs.exists(path))


def read_parquet(output: OutputSpec, url: str) -> pa.Table:
    fs, path = url_to_fs(url, **output.fsspec_options())
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle)


def write_json(output: OutputSpec, url: str, payload: dict[str, Any]) -> None:
    data = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
    atomic_write(output, url, lambda handle: handle.write(data))
