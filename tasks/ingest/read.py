"""Fetch a shard's files in one batched call and parse them into documents, each with a stable id.

A file that cannot be fetched because it vanished, or is larger than allowed, becomes an error document; any other
storage failure is raised so Prefect retries the whole shard (object stores fail transiently).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from docroute.schemas.documents import DocumentRef
from docroute.schemas.outcomes import DocumentErrorCode
from docroute.schemas.page_geometry import PageLine
from docroute.schemas.spec import SourceSpec
from docroute.tasks.ingest.discover import source_filesystem
from docroute.tasks.ingest.parse import detect_format, parse_document


@dataclass(frozen=True, slots=True)
class SourceDocument:
    """One document to answer (text set) or to report (error set)."""

    doc_id: str
    uri: str
    record_key: str | None
    content_sha256: str | None
    format: str | None
    text: str | None
    error: str | None
    etag: str | None = None  # the listing's ETag of the file, so the state table can tell a changed file
    error_code: DocumentErrorCode | None = None  # why there is no text, typed (set with `error`)
    pages: int | None = None  # pdf and image: the page count (tasks/ingest/parse.py ParsedDocument)
    ocr_pages: int | None = None  # pdf and image: pages read by OCR
    ocr_confidence: float | None = None  # mean confidence of the OCR'd lines
    ocr_unread_pages: int | None = None  # pages left unread by OCR when source.max_ocr_seconds ran out
    lines: tuple[PageLine, ...] = ()  # the OCR'd lines with their boxes, for the extraction rankers (Request.geometry)

    @property
    def ok(self) -> bool:
        return self.error is None


def document_id(uri: str, record_key: str | None = None) -> str:
    """A stable id from the URI (and record key): the same document gets the same id on every run."""
    key = uri if record_key is None else f"{uri}\x00{record_key}"  # NUL never occurs in a file name or URI
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def _failed(ref: DocumentRef, code: DocumentErrorCode, reason: str, fmt: str | None = None) -> SourceDocument:
    return SourceDocument(document_id(ref.uri), ref.uri, None, None, fmt, None, f"{code}: {reason}", ref.etag, code)


def read_documents(source: SourceSpec, refs: Sequence[DocumentRef]) -> list[SourceDocument]:
    """Fetch and parse every ref; returns at least one document per ref, in ref order."""
    fs, _ = source_filesystem(source)
    fetchable = []
    early: dict[str, SourceDocument] = {}
    for ref in refs:
        if ref.size is not None and ref.size > source.max_bytes:
            early[ref.uri] = _failed(
                ref,
                DocumentErrorCode.TOO_LARGE,
                f"the file has {ref.size:,} bytes, over source.max_bytes ({source.max_bytes:,})",
                detect_format(ref.uri, source.format),
            )
        else:
            fetchable.append(ref)
    paths = [ref.path for ref in fetchable]
    contents = dict(zip(paths, _fetch(fs, fetchable), strict=True)) if paths else {}
    documents: list[SourceDocument] = []
    for ref in refs:
        if ref.uri in early:
            documents.append(early[ref.uri])
            continue
        data = contents.get(ref.path)
        if isinstance(data, FileNotFoundError) or data is None:
            documents.append(
                _failed(ref, DocumentErrorCode.MISSING, "the file was listed but is gone (deleted during the run?)")
            )
            continue
        if isinstance(data, PermissionError | IsADirectoryError | NotADirectoryError):  # this file only, for good
            documents.append(_failed(ref, DocumentErrorCode.UNREADABLE, f"{type(data).__name__}: {data}"))
            continue
        if isinstance(data, BaseException):
            raise data  # transient (network, throttling): the shard task retries
        digest = hashlib.sha256(data).hexdigest()
        for parsed in parse_document(data, uri=ref.uri, source=source):
            documents.append(
                SourceDocument(
                    doc_id=document_id(ref.uri, parsed.record_key),
                    uri=ref.uri,
                    record_key=parsed.record_key,
                    content_sha256=digest,
                    format=parsed.format,
                    text=parsed.text,
                    error=parsed.error,
                    etag=ref.etag,
                    error_code=parsed.error_code,
                    pages=parsed.pages,
                    ocr_pages=parsed.ocr_pages,
                    ocr_confidence=parsed.ocr_confidence,
                    ocr_unread_pages=parsed.ocr_unread_pages,
                    lines=parsed.lines,
                )
            )
    return documents


def _fetch(fs: AbstractFileSystem, refs: Sequence[DocumentRef]) -> list[bytes | BaseException]:
    """Every file's bytes, or the exception reading it raised.

    Object stores get fsspec's `cat_ranges`, which reads many files concurrently and, unlike `cat`, never expands
    names as globs (a file called "report[1].txt" is read, not matched as a pattern). s3fs would first send a HEAD
    per file, to decide whether to split a large one into concurrent ranged GETs; the listing already gave every
    size, so when none is that large it is told not to (one GET per document instead of HEAD + GET). A local
    folder is read with plain `open`: fsspec's per-file opener costs more than the read itself for small files.
    """
    paths = [ref.path for ref in refs]
    if isinstance(fs, LocalFileSystem):
        contents: list[bytes | BaseException] = []
        for path in paths:
            try:
                with open(path, "rb") as handle:  # noqa: PTH123 - the fast path; Path.open adds a layer per file
                    contents.append(handle.read())
            except OSError as exc:
                contents.append(exc)
        return contents
    options: dict[str, int] = {}
    block = getattr(fs, "default_block_size", None)
    if _is_s3(fs) and block and all(ref.size is not None and ref.size <= block for ref in refs):
        options["max_concurrency"] = 1
    return fs.cat_ranges(paths, None, None, on_error="return", **options)


def _is_s3(fs: AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "s3" in protocol
