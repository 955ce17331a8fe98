"""Turn the bytes of one source file into the text a model reads, or into a precise reason why it cannot be.

A batch job meets every kind of broken input: scanned PDFs, password-protected files, zip bombs, binary junk
with a .txt name, JSON lines cut in half. One bad file must become one error row that says what is wrong,
never an exception that kills a shard, so `parse_document` catches everything its parsers raise and returns
`ParsedDocument`s carrying a short `error_code` (stable, for grouping and dashboards) and an `error` sentence
(for the person who has to fix the file). The sentence starts with the code, so a text column still groups.
"""

from __future__ import annotations

import codecs
import io
import json
import logging
import re
import struct
import unicodedata
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bs4 import BeautifulSoup, Tag

from docroute.schemas.outcomes import DocumentErrorCode
from docroute.schemas.spec import SourceSpec
from docroute.tasks.ingest.layout import PageLine, lines_text, mean_confidence

SUPPORTED_FORMATS: tuple[str, ...] = ("txt", "md", "html", "pdf", "docx", "eml", "json", "jsonl", "image")

EXTENSION_FORMATS: dict[str, str] = {
    ".txt": "txt",
    ".text": "txt",
    ".log": "txt",
    ".md": "md",
    ".markdown": "md",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
    ".pdf": "pdf",
    ".docx": "docx",
    ".eml": "eml",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".png": "image",
    ".jpg": "image",
    ".jpeg": "image",
    ".tif": "image",
    ".tiff": "image",
    ".webp": "image",
}

#: Every `error_code` parse_document can produce, with what it means.
ERROR_CODES: dict[str, str] = {
    "empty": "no bytes, or nothing but whitespace once parsed",
    "too_large": "larger than source.max_bytes, or ran out of memory while parsing",
    "too_complex": "nested too deeply for the parser",
    "binary": "bytes that are not text in any encoding (NUL bytes, many control bytes)",
    "decode": "text whose encoding cannot be determined, or that the forced encoding cannot decode",
    "unsupported_format": "no parser for this file extension",
    "html_no_text": "HTML with no visible text (only scripts, styles, hidden elements)",
    "pdf_encrypted": "a PDF that only opens with a password",
    "pdf_corrupt": "not a PDF, or one pypdf cannot read",
    "pdf_no_text": "a PDF without a text layer, and OCR is not installed (the [ocr] extra)",
    "docx_corrupt": "not a .docx (ZIP) package, or one python-docx cannot read",
    "docx_too_large": "a .docx whose ZIP would expand beyond the zip-bomb guard",
    "eml_corrupt": "an email the stdlib parser cannot read",
    "json_corrupt": "invalid JSON (a whole .json file, or one line of a .jsonl file)",
    "json_not_object": "a JSON record that is not an object",
    "json_missing_text": "a JSON record without a value at source.text_field (or null)",
    "json_bad_text": "a JSON record whose text field holds an object, list or boolean",
    "parse_failed": "an unexpected error inside a third-party parser",
    "missing": "listed, then gone before it was read (deleted during the run)",
    "unreadable": "the storage refused it for good (permissions, a folder where a file was listed)",
    "image_corrupt": "not a png/jpeg/tiff/webp image Pillow can open, or a page of it that cannot be decoded",
    "image_too_large": "a page over the pixel limit, read from its header before decoding (a decompression bomb)",
    "too_many_pages": "more pages needing OCR than source.max_pages",
    "ocr_no_text": "OCR found no text on any page (blank or unreadable scans); blank pages among others are skipped",
    "ocr_unavailable": "an image, and OCR (docroute's [ocr] extra) is not installed",
    "ocr_time_limit": "source.max_ocr_seconds ran out before OCR read any text (a partly read one keeps its pages)",
}

#: A PDF page whose text layer has fewer characters than this (a page number, a stamp) is rendered and OCR'd: a
#: scanned page often carries a few characters of text layer added by the scanner, and that is not its content.
PDF_MIN_PAGE_CHARS = 32

_PDF_MAX_PAGES = 2000
_ZIP_MAX_MEMBERS = 10_000
_ZIP_MAX_EXPANSION = 50
_ZIP_MAX_TOTAL_BYTES = 100 * 1024 * 1024
_ZIP_MEMBER_MAX_RATIO = 100
_ZIP_MEMBER_RATIO_MIN_BYTES = 10 * 1024 * 1024
_BINARY_CONTROL_RATIO = 0.10
# Western European text is mostly ASCII letters; a higher share of accented ones means another script's bytes.
_WESTERN_MAX_ACCENTED = 0.4
# Non-letters that sit between letters in real text (apostrophes, dashes, the Catalan middle dot, no-break space).
_WESTERN_IN_WORD = frozenset("\u2019\u2018\u2013\u2014\u00b7\u00a0")

# Control characters real text never holds; \t \n \r \f and ESC (ANSI colour codes in logs) are excluded.
_CONTROL_BYTES = bytes([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x1B), *range(0x1C, 0x20), 0x7F])
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")
_BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_META_CHARSET = re.compile(rb"""<meta[^>]{0,512}?charset\s*=\s*["']?\s*([a-zA-Z0-9_.:-]{1,40})""", re.IGNORECASE)
_XML_ENCODING = re.compile(rb"""^\s*<\?xml[^>]{0,200}?encoding\s*=\s*["']([a-zA-Z0-9_.:-]{1,40})""")
_HTML_WHITESPACE = re.compile(r"[ \t\n\r\f]+")

_HTML_INVISIBLE = frozenset(
    {"script", "style", "noscript", "template", "iframe", "object", "embed", "svg", "canvas", "head", "title"}
    | {"datalist", "meta", "link", "base"}
)
_HTML_BLOCKS = frozenset(
    {"address", "article", "aside", "blockquote", "body", "caption", "dd", "details", "dialog", "div", "dl"}
    | {
        "dt",
        "fieldset",
        "figcaption",
        "figure",
        "footer",
        "form",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
    }
    | {"hgroup", "hr", "html", "legend", "li", "main", "menu", "nav", "ol", "option", "p", "pre", "section"}
    | {"summary", "table", "tbody", "textarea", "tfoot", "thead", "tr", "ul"}
)
_HTML_CELLS = frozenset({"td", "th"})
_HTML_PREFORMATTED = frozenset({"pre", "textarea", "listing", "plaintext"})

_MISSING = object()
_logger = logging.getLogger(__name__)
_LOCAL_SCHEMES = frozenset({"file", "local"})


@dataclass(frozen=True, slots=True)
class ParsedDocument:
    """One document's text, or why there is none.

    `record_key` tells records of one json/jsonl file apart (the id_field value, else the 0-based record
    index); a whole file has None. It is unique within its file, because the document id is derived from it: a
    repeated id, or a position that another record's id already names, gets "@<index>" appended. Exactly one
    of `text` and `error` is set; `error_code` says why, typed (its meaning: `ERROR_CODES`).
    """

    record_key: str | None
    text: str | None
    format: str
    error: str | None = None
    error_code: DocumentErrorCode | None = None
    pages: int | None = None  # pdf and image: the document's page count
    ocr_pages: int | None = None  # pdf and image: how many of them were read by OCR
    ocr_confidence: float | None = None  # the mean confidence of the OCR'd lines; None when nothing was OCR'd
    lines: tuple[PageLine, ...] = ()  # the lines in reading order with their boxes: OCR'd, or a PDF's text layer
    ocr_unread_pages: int | None = None  # pdf and image: pages needing OCR left unread when max_ocr_seconds ran out

    @property
    def ok(self) -> bool:
        return self.error is None


class _DocumentError(Exception):
    """Unwinds a parser to parse_document carrying the row's error code and its human reason."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = DocumentErrorCode(code)  # a code outside the enum is a bug here, not a document's fault
        super().__init__(f"{self.code}: {reason}")
        self.reason = reason


def _failed(fmt: str, code: str, reason: str, record_key: str | None = None) -> ParsedDocument:
    typed = DocumentErrorCode(code)
    return ParsedDocument(record_key, None, fmt, error=f"{typed}: {reason}", error_code=typed)


def detect_format(uri: str, declared: str) -> str:
    """Return the parser for a file: the declared format, or (for "auto") the one its extension names.

    Query strings and fragments of remote URLs are ignored (s3 version ids, signed URLs), but a local file's
    "#" or "?" is part of its name ("Invoice #42.txt"); an extension docroute has no parser for, or none at
    all, gives "unknown" so the file becomes an `unsupported_format` row instead of being read with the wrong
    parser.
    """
    declared = (declared or "auto").strip().lower()
    if declared != "auto":
        return declared if declared in SUPPORTED_FORMATS else "unknown"
    return EXTENSION_FORMATS.get(_extension(uri), "unknown")


def _extension(uri: str) -> str:
    """The lower-cased extension of a URI's file name, or "" when it has none.

    Listings hand over names verbatim, so "#" and "?" in them are literal: a local path keeps them, and a remote
    URI drops what follows them only when that leaves a known extension ("report.pdf?versionId=x") or the
    literal name has none docroute knows ("s3://bucket/Invoice #42.txt" is still a .txt).
    """
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.lower() in _LOCAL_SCHEMES:
        return _name_extension(rest if sep else uri)
    stripped = _name_extension(rest.split("?", 1)[0].split("#", 1)[0])
    literal = _name_extension(rest)
    if stripped in EXTENSION_FORMATS or literal not in EXTENSION_FORMATS:
        return stripped or literal
    return literal


def _name_extension(path: str) -> str:
    name = path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    stem, dot, suffix = name.rpartition(".")
    return f".{suffix.lower()}" if dot and stem else ""


def parse_document(data: bytes, *, uri: str, source: SourceSpec) -> list[ParsedDocument]:
    """Parse one file into one document (or one per json/jsonl record); never raises for bad input.

    A failure of the whole file is a single error document with record_key None; a bad json/jsonl record fails
    alone. Anything a third-party parser throws is caught here, because one hostile file must not take down
    the shard it sits in.
    """
    fmt = detect_format(uri, source.format)
    try:
        return _parse(bytes(data), uri=uri, source=source, fmt=fmt)
    except _DocumentError as failure:
        return [_failed(fmt, failure.code, failure.reason)]
    except RecursionError:
        return [_failed(fmt, "too_complex", f"the {fmt} structure is nested too deeply to parse")]
    except MemoryError:
        return [_failed(fmt, "too_large", f"ran out of memory while parsing {len(data):,} bytes of {fmt}")]
    except Exception as exc:
        return [_failed(fmt, "parse_failed", f"unexpected error in the {fmt} parser: {_describe(exc)}")]


def _parse(data: bytes, *, uri: str, source: SourceSpec, fmt: str) -> list[ParsedDocument]:
    if fmt == "unknown":
        raise _DocumentError("unsupported_format", _unsupported_reason(uri, source.format))
    if len(data) > source.max_bytes:
        raise _DocumentError("too_large", f"{len(data):,} bytes exceeds source.max_bytes ({source.max_bytes:,})")
    if not data:
        raise _DocumentError("empty", "the file is 0 bytes")
    if not data.strip():
        raise _DocumentError("empty", f"the file holds only whitespace ({len(data):,} bytes)")
    if fmt in ("json", "jsonl"):
        text = _decode_text(data, forced=source.encoding)
        if not text.strip():
            raise _DocumentError("empty", f"no text left after decoding the {fmt} file (only whitespace)")
        return _parse_json(text, source) if fmt == "json" else _parse_jsonl(text, source)
    if fmt == "txt":
        text = _decode_text(data, forced=source.encoding)
    elif fmt == "md":
        text = markdown_text(_decode_text(data, forced=source.encoding))
    elif fmt == "html":
        text = _html_text(data, forced=source.encoding)
    elif fmt == "pdf":
        return [_pdf_document(data, source)]
    elif fmt == "image":
        return [_image_document(data, source)]
    elif fmt == "docx":
        text = _docx_text(data)
    else:
        text = _eml_text(data, forced=source.encoding)
    if not text.strip():
        raise _DocumentError("empty", f"no text left after parsing the {fmt} file (only whitespace)")
    return [ParsedDocument(None, text, fmt)]


_MD_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^```.*$|^~~~.*$", re.M), ""),  # code fences (their content stays)
    (re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M), r"\1"),  # ATX headings
    (re.compile(r"^\s{0,3}(?:[-*_]\s*){3,}$", re.M), ""),  # horizontal rules
    (re.compile(r"^\s{0,3}>\s?", re.M), ""),  # block quotes
    (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),  # images: keep the alt text
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # links: keep the text
    (re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1"), r"\2"),  # bold
    (re.compile(r"(?<![\w*])([*_])(?=\S)(.+?)(?<=\S)\1(?![\w*])"), r"\2"),  # italics
    (re.compile(r"`([^`]+)`"), r"\1"),  # inline code
    (re.compile(r"[ \t]+$", re.M), ""),  # hard-break spaces
)


def markdown_text(text: str) -> str:
    """Drop Markdown syntax a reader does not see (heading marks, emphasis, link targets); keep the words and lines.

    Values copied from the text must not carry a stray '#' or '**' into a typed column.
    """
    for pattern, replacement in _MD_RULES:
        text = pattern.sub(replacement, text)
    return text


def _unsupported_reason(uri: str, declared: str) -> str:
    supported = ", ".join(sorted(EXTENSION_FORMATS))
    if declared != "auto":
        return f"source.format {declared!r} is not one of {', '.join(SUPPORTED_FORMATS)}"
    ext = _extension(uri)
    if not ext:
        return f"the file name has no extension; set source.format or use one of: {supported}"
    return f"no parser for {ext!r} files; supported extensions: {supported}"


def _describe(exc: BaseException) -> str:
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _percent(ratio: float) -> str:
    return f"{ratio:.0%}" if ratio >= 0.1 else f"{ratio:.1%}"


# --- text decoding ------------------------------------------------------------------------------------------


def _decode_text(data: bytes, *, forced: str | None = None, hint: str | None = None) -> str:
    """Decode bytes as a careful person would: forced encoding, BOM, declared hint, UTF-8, then detection.

    Binary junk is rejected before detection because charset-normalizer will happily "decode" random bytes
    into some code page, which would hand the model garbage instead of giving the user an error row.
    """
    if forced:
        text = _decode_forced(data, forced)
    elif (bom := _bom_decode(data)) is not None:
        text = bom
    else:
        # BOM-less UTF-16 comes first: its NUL bytes are valid UTF-8, but no real UTF-8 text looks like it.
        text = _sniff_utf16(data) or (_try_decode(data, hint) if hint else None) or _try_decode(data, "utf-8")
        if text is None:
            text = _guess_encoding(data)
    _reject_control_heavy(text)
    return _normalise(text)


def _decode_forced(data: bytes, encoding: str) -> str:
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise _DocumentError("decode", f"source.encoding {encoding!r} is not an encoding Python knows") from None
    if codec == "utf-8":
        codec = "utf-8-sig"  # a forced UTF-8 must still swallow a BOM
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        raise _DocumentError(
            "decode", f"not valid {encoding} (forced by source.encoding): {_byte_error(exc)}"
        ) from None


def _bom_decode(data: bytes) -> str | None:
    for bom, codec in _BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom) :].decode(codec)
            except UnicodeDecodeError as exc:
                if codec.startswith("utf-32"):
                    continue  # FF FE 00 00 is also a UTF-16 LE BOM followed by a NUL character
                raise _DocumentError(
                    "decode", f"starts with a {codec} byte-order mark but {_byte_error(exc)}"
                ) from None
    return None


def _byte_error(exc: UnicodeDecodeError) -> str:
    bad = exc.object[exc.start : exc.start + 4]
    return f"bytes {bad.hex(' ')} at offset {exc.start} ({exc.reason})"


def _try_decode(data: bytes, encoding: str) -> str | None:
    try:
        return data.decode(encoding)
    except (UnicodeDecodeError, LookupError):
        return None


def _sniff_utf16(data: bytes) -> str | None:
    """Recognise BOM-less UTF-16 (Windows exports) by its NUL byte on every other position."""
    sample = data[:4096]
    half = len(sample) // 2
    if half < 2 or len(data) % 2:
        return None
    even_nuls = sample[0::2].count(0)
    odd_nuls = sample[1::2].count(0)
    if odd_nuls >= 0.4 * half and even_nuls <= 0.02 * half:
        return _try_decode(data, "utf-16-le")
    if even_nuls >= 0.4 * half and odd_nuls <= 0.02 * half:
        return _try_decode(data, "utf-16-be")
    return None


def _guess_encoding(data: bytes) -> str:
    """Pick a legacy encoding for bytes that are not UTF-8, after ruling out binary data.

    Windows-1252 (a superset of the latin-1 letters) is by far the most common legacy encoding, and
    charset-normalizer is unreliable on short Western text: it reads the latin-1 bytes of "Crème fraîche,
    déjà vu" as Baltic cp1257 ("Crčme fraīche, déją vu") and "café naïve" scores exactly as well in Farsi
    cp1006. So bytes whose cp1252 reading looks like Western European text are taken as cp1252 before any
    detection runs; among detection's equally good candidates cp1252 wins as well.
    """
    controls = len(data) - len(data.translate(None, _CONTROL_BYTES))
    ratio = controls / len(data)
    if b"\x00" in data or ratio > _BINARY_CONTROL_RATIO:
        nul = "NUL bytes, " if b"\x00" in data else ""
        raise _DocumentError(
            "binary",
            f"not UTF-8 text and no other encoding fits: looks like binary data ({nul}{_percent(ratio)} control bytes)",
        )
    western = _try_decode(data, "cp1252")
    if western is not None and _looks_western(western):
        return western
    from charset_normalizer import from_bytes

    matches = list(from_bytes(data))
    if not matches:
        start = _utf8_error_offset(data)
        raise _DocumentError(
            "decode",
            f"not UTF-8 text (invalid byte at offset {start}) and no other encoding fits: "
            "charset detection found no plausible encoding; set source.encoding",
        )
    best = matches[0]
    for match in matches:
        tied = abs(match.chaos - best.chaos) < 0.01 and abs(match.coherence - best.coherence) < 0.01
        if tied and "cp1252" in match.could_be_from_charset and (text := _try_decode(data, "cp1252")) is not None:
            return text
    return str(best)


def _looks_western(text: str) -> bool:
    """Whether a cp1252 reading is plausible Western European text rather than another code page's mojibake.

    Cyrillic, Greek, Hebrew or Arabic bytes read as cp1252 are nearly all accented letters ("Ïðèâåò ìèð");
    Central European ones put symbols inside words ("Za¿ó³æ" for "Zażółć"). Real Western text has mostly
    unaccented letters and no symbol between two letters except apostrophes, dashes and the middle dot.
    """
    letters = accented = 0
    for index, char in enumerate(text):
        if char.isascii():
            letters += char.isalpha()
            continue
        if char.isalpha():
            letters += 1
            accented += 1
        elif char not in _WESTERN_IN_WORD and _between_letters(text, index):
            return False
    return letters > 0 and accented <= _WESTERN_MAX_ACCENTED * letters


def _between_letters(text: str, index: int) -> bool:
    return 0 < index < len(text) - 1 and text[index - 1].isalpha() and text[index + 1].isalpha()


def _utf8_error_offset(data: bytes) -> int:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    return -1


def _reject_control_heavy(text: str) -> None:
    if not text:
        return
    controls = len(_CONTROL_CHARS.findall(text))
    ratio = controls / len(text)
    if ratio > _BINARY_CONTROL_RATIO:
        raise _DocumentError("binary", f"decodes, but looks like binary data ({_percent(ratio)} control characters)")


def _normalise(text: str) -> str:
    """One canonical form for every format, so the same words always give the same tokens and hashes."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return unicodedata.normalize("NFC", text)


# --- HTML ---------------------------------------------------------------------------------------------------


def _html_text(data: bytes, *, forced: str | None) -> str:
    text = _decode_html(data, forced=forced)
    visible = html_visible_text(text)
    if visible is None:
        raise _DocumentError("html_no_text", "no visible text outside scripts, styles and hidden elements")
    return visible


def _decode_html(data: bytes, *, forced: str | None, declared: str | None = None) -> str:
    """Decode HTML trying the charset it declares first (transport, then <meta> or XML declaration).

    Following the HTML standard, a declared latin-1/ASCII means windows-1252, and a declared UTF-16 in a page
    whose declaration is readable as ASCII means UTF-8.
    """
    if forced or _has_bom(data):
        return _decode_text(data, forced=forced)
    head = data[:4096]
    match = _META_CHARSET.search(head) or _XML_ENCODING.search(head)
    hint = declared or (match.group(1).decode("ascii", "replace") if match else None)
    return _decode_text(data, hint=_html_charset(hint) if hint else None)


def _has_bom(data: bytes) -> bool:
    return any(data.startswith(bom) for bom, _ in _BOMS)


def _html_charset(name: str) -> str | None:
    try:
        codec = codecs.lookup(name).name
    except LookupError:
        return None
    if codec in ("latin-1", "iso8859-1", "ascii"):
        return "cp1252"
    if codec.startswith(("utf-16", "utf-32")):
        return "utf-8"
    return codec


def html_visible_text(html: str) -> str | None:
    """Return what a reader sees: the title, then body text with one line per block; None if nothing.

    Hidden content (scripts, styles, templates, `hidden`, aria-hidden, display:none) is skipped because it is
    noise to a classifier and often tracking code. Inline elements stay on their line (get_text("\\n") would
    put every <b> on its own line). The walk is iterative so a deeply nested page cannot overflow the stack.
    """
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "lxml")
    title = _html_title(soup)
    body = _collapse_lines(_html_walk(soup))
    if not body:
        return None
    return f"{title}\n{body}" if title else body


def _html_title(soup: BeautifulSoup) -> str:
    for title in soup.find_all("title"):
        if not any(parent.name == "svg" for parent in title.parents):
            return " ".join(title.get_text(" ").split())
    return ""


def _html_walk(soup: BeautifulSoup) -> str:
    from bs4 import NavigableString, Tag
    from bs4.element import CData

    parts: list[str] = []
    # (node, closing, preformatted): closing entries emit the newline that ends a block element.
    stack: list[tuple[Any, bool, bool]] = [(child, False, False) for child in reversed(soup.contents)]
    while stack:
        node, closing, pre = stack.pop()
        if closing:
            parts.append("\n")
        elif isinstance(node, Tag):
            name = (node.name or "").lower()
            if name in _HTML_INVISIBLE or _html_hidden(node):
                continue
            if name == "br":
                parts.append("\n")
                continue
            if name in _HTML_CELLS and node.find_previous_sibling(_HTML_CELLS) is not None:
                parts.append(" | ")
            if name in _HTML_BLOCKS:
                parts.append("\n")
                stack.append((node, True, pre))
            inner_pre = pre or name in _HTML_PREFORMATTED
            stack.extend((child, False, inner_pre) for child in reversed(node.contents))
        elif type(node) in (NavigableString, CData):  # not Comment, Doctype or other markup strings
            parts.append(str(node) if pre else _HTML_WHITESPACE.sub(" ", str(node)))
    return "".join(parts)


def _html_hidden(tag: Tag) -> bool:
    if tag.has_attr("hidden"):
        return True
    if str(tag.get("aria-hidden", "")).strip().lower() == "true":
        return True
    style = "".join(str(tag.get("style", "")).lower().split())
    return "display:none" in style or "visibility:hidden" in style


def _collapse_lines(text: str) -> str:
    lines = (" ".join(line.split()) for line in _normalise(text).split("\n"))
    return "\n".join(line for line in lines if line)


# --- PDF ----------------------------------------------------------------------------------------------------


def _quiet_pypdf() -> None:
    """Keep pypdf from logging a warning per broken object of a corrupt file; the error row already says why.

    pypdf logs through loggers named after its modules, so only the "pypdf" parent's level silences them all.
    It is raised only when the application left it unset, so an explicit logging configuration still wins.
    """
    logger = logging.getLogger("pypdf")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)


def _pdf_page_texts(data: bytes) -> tuple[list[str], int, list[tuple[PageLine, ...]]]:
    """The text layer of each page (up to `_PDF_MAX_PAGES`), the PDF's page count, and each page's lines.

    pypdf opens the file and decides what is corrupt or encrypted, as before OCR existed. The text itself is read by
    PDFium when the [ocr] extra is installed: its lines come in reading order with their boxes
    (`ocr.pdf_text_layers`), and on receipts whose lines were not drawn top to bottom it made 0.5% character errors
    where pypdf's drawing-order text made 80% (10% drawn in order; bench/pdf_text.py, BENCHMARKS.md). Without the
    extra, or when PDFium cannot open what pypdf can, pypdf's text is kept and pages have no lines.
    """
    start = data.find(b"%PDF-", 0, 1024)
    if start < 0:
        raise _DocumentError(
            "pdf_corrupt", f"no %PDF- header in the first 1 KiB: not a PDF (starts with {data[:16]!r})"
        )
    from pypdf import PdfReader

    _quiet_pypdf()
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        encrypted = reader.is_encrypted
    except (RecursionError, MemoryError):
        raise
    except Exception as exc:
        raise _DocumentError("pdf_corrupt", f"pypdf cannot read it: {_describe(exc)}{_pdf_cut_off(data)}") from None
    if encrypted:
        _pdf_unlock(reader)
    try:
        pages = reader.pages
        count = len(pages)
    except Exception as exc:
        reason = f"pypdf cannot read its page tree: {_describe(exc)}{_pdf_cut_off(data)}"
        raise _DocumentError("pdf_corrupt", reason) from None
    if count == 0:
        raise _DocumentError("pdf_corrupt", "the PDF has no readable pages")
    layers = _pdfium_text_layers(data, min(count, _PDF_MAX_PAGES))
    if layers is not None:
        return [page.text for page in layers], count, [page.lines for page in layers]
    texts: list[str] = []
    errors: list[str] = []
    for index in range(min(count, _PDF_MAX_PAGES)):
        try:
            texts.append(pages[index].extract_text() or "")
        except (RecursionError, MemoryError):
            raise
        except Exception as exc:
            errors.append(f"page {index + 1}: {_describe(exc)}")
            texts.append("")  # one entry per page, so an index is a page number
    if errors and len(errors) == min(count, _PDF_MAX_PAGES):
        raise _DocumentError("pdf_corrupt", f"no page could be read; {errors[0]}{_pdf_cut_off(data)}")
    return texts, count, [() for _ in texts]


def _pdfium_text_layers(data: bytes, count: int) -> list[Any] | None:
    """PDFium's text layer of the first `count` pages, or None without the [ocr] extra or when PDFium cannot open it."""
    from docroute.tasks.ingest import ocr

    if not ocr.ocr_available():
        return None
    try:
        layers = ocr.pdf_text_layers(data, count)
    except ocr.OcrRefusedError:
        return None
    return layers if len(layers) == count else None


def _pdf_document(data: bytes, source: SourceSpec) -> ParsedDocument:
    """A PDF's text: each page's text layer, or OCR of the rendered page where the layer is (nearly) empty.

    Decided per page, because scanned pages and born-digital ones mix in one file (a typed letter with a signed
    scan appended). A page whose layer has fewer than `PDF_MIN_PAGE_CHARS` characters is OCR'd; when OCR finds
    nothing there, the layer's few characters are kept. Without the [ocr] extra the text-layer pages are kept and
    a PDF with none is `pdf_no_text`, as before OCR existed. OCR stops once `source.max_ocr_seconds` is spent: the
    pages read are kept and `ocr_unread_pages` counts the rest, or, when no page has any text, the row is
    `ocr_time_limit`.
    """
    from docroute.tasks.ingest import ocr

    texts, count, layer_lines = _pdf_page_texts(data)
    # A page pypdf could not read has an empty layer, so it is OCR'd too: PDFium may render what pypdf cannot parse.
    scanned = [index for index, text in enumerate(texts) if len(text.strip()) < PDF_MIN_PAGE_CHARS]
    page_texts = [text.strip() for text in texts]
    page_lines = list(layer_lines)
    ocr_lines: list[PageLine] = []
    ocr_pages = 0
    unread = 0
    seconds = 0.0
    if scanned and ocr.ocr_available():
        if len(scanned) > source.max_pages:
            raise _DocumentError(
                "too_many_pages",
                f"{len(scanned)} of its {count} pages have no text layer and need OCR; source.max_pages is "
                f"{source.max_pages}",
            )
        deadline = ocr.OcrDeadline(source.max_ocr_seconds)
        try:
            for index, image in ocr.render_pdf_pages(data, scanned, deadline=deadline):
                page = ocr.ocr_image(image, page=index + 1, threads=source.ocr_threads)
                ocr_pages += 1
                if page.lines:
                    ocr_lines.extend(page.lines)
                    page_lines[index] = page.lines
                    page_texts[index] = lines_text(page.lines)
        except ocr.OcrRefusedError as refused:
            # A page PDFium cannot render loses only its OCR: the text-layer pages still stand, as before OCR.
            if refused.code != DocumentErrorCode.PDF_CORRUPT or not any(page_texts):
                raise _DocumentError(refused.code, refused.reason) from None
        else:
            unread = len(scanned) - ocr_pages
        seconds = deadline.elapsed
    text = _normalise("\n\n".join(page for page in page_texts if page))
    if not text.strip():
        if unread:
            raise _DocumentError("ocr_time_limit", _time_limit_reason(source, ocr_pages, unread, seconds))
        if ocr_pages:
            raise _DocumentError("ocr_no_text", f"OCR found no text on any of its {count} page(s) (blank scans?)")
        raise _DocumentError(
            "pdf_no_text",
            f"no text layer on any of its {count} page(s); scanned PDFs need OCR: install docroute's [ocr] extra",
        )
    if unread:
        _logger.info("%s", _time_limit_reason(source, ocr_pages, unread, seconds))
    return ParsedDocument(
        None,
        text,
        "pdf",
        pages=count,
        ocr_pages=ocr_pages,
        ocr_confidence=mean_confidence(ocr_lines),
        lines=tuple(line for lines in page_lines for line in lines),
        ocr_unread_pages=unread,
    )


def _time_limit_reason(source: SourceSpec, read: int, unread: int, elapsed: float) -> str:
    return (
        f"OCR stopped after {elapsed:.0f} s (source.max_ocr_seconds is {source.max_ocr_seconds:g}): {read} page(s) "
        f"read, {unread} page(s) needing OCR left unread"
    )


def _image_document(data: bytes, source: SourceSpec) -> ParsedDocument:
    """An image file's text by OCR, page by page (a TIFF's frames), refused from its headers when hostile.

    Blank pages among others are skipped (separator sheets, the backs of pages); a file where OCR finds no text
    at all is `ocr_no_text`, a reasoned error rather than an empty document the model would answer anyway. Pages
    after `source.max_ocr_seconds` is spent are not decoded: the pages read are kept (`ocr_unread_pages` counts the
    rest), or the row is `ocr_time_limit` when they held no text.
    """
    from docroute.tasks.ingest import ocr

    try:
        ocr.require_ocr("an image")
        lines: list[PageLine] = []
        frames = ocr.image_pages(data, max_pages=source.max_pages)
        deadline = ocr.OcrDeadline(source.max_ocr_seconds)
        read = 0
        for number in range(1, len(frames) + 1):
            if deadline.expired():
                break
            lines.extend(ocr.ocr_image(next(frames), page=number, threads=source.ocr_threads).lines)
            read += 1
    except ocr.OcrRefusedError as refused:
        raise _DocumentError(refused.code, refused.reason) from None
    unread = len(frames) - read
    if not lines:
        if unread:
            raise _DocumentError("ocr_time_limit", _time_limit_reason(source, read, unread, deadline.elapsed))
        raise _DocumentError("ocr_no_text", f"OCR found no text on any of its {read} page(s) (blank or unreadable)")
    if unread:
        _logger.info("%s", _time_limit_reason(source, read, unread, deadline.elapsed))
    return ParsedDocument(
        None,
        _normalise(lines_text(lines)),
        "image",
        pages=len(frames),
        ocr_pages=read,
        ocr_confidence=mean_confidence(lines),
        lines=tuple(lines),
        ocr_unread_pages=unread,
    )


def _pdf_cut_off(data: bytes) -> str:
    """Name the usual cause when pypdf gives up on a file without an end: a download or copy cut short.

    pypdf's own message ("Stream has ended unexpectedly") does not tell the owner that the file is incomplete
    and that fetching it again, not repairing it, is the fix. Writers end every PDF with %%EOF, allowed within
    the last 1 KiB.
    """
    if b"%%EOF" in data[-1024:]:
        return ""
    return "; the file has no %%EOF marker at its end, so it is probably truncated (an interrupted download or copy)"


def _pdf_unlock(reader: Any) -> None:
    """Open PDFs encrypted only against editing: their user password is empty and every viewer opens them."""
    from pypdf import PasswordType

    try:
        result = reader.decrypt("")
    except Exception as exc:
        if type(exc).__name__ == "DependencyError":
            raise _DocumentError("pdf_encrypted", f"decrypting it needs an optional package: {exc}") from None
        raise _DocumentError("pdf_encrypted", f"its encryption cannot be opened: {_describe(exc)}") from None
    if result == PasswordType.NOT_DECRYPTED:
        raise _DocumentError("pdf_encrypted", "the PDF is password-protected and the empty password does not open it")


# --- DOCX ---------------------------------------------------------------------------------------------------


def _docx_text(data: bytes) -> str:
    _check_docx_package(data)
    import docx

    try:
        document = docx.Document(io.BytesIO(data))
    except (RecursionError, MemoryError):
        raise
    except Exception as exc:
        raise _DocumentError("docx_corrupt", f"python-docx cannot open it: {_describe(exc)}") from None
    try:
        return _normalise("\n".join(_docx_blocks(document)))
    except (RecursionError, MemoryError):
        raise
    except Exception as exc:  # python-docx parses lazily, so malformed content surfaces only here
        raise _DocumentError("docx_corrupt", f"python-docx cannot read its body: {_describe(exc)}") from None


def _check_docx_package(data: bytes) -> None:
    """Vet the ZIP from its directory alone, so a zip bomb is refused without inflating a byte of it."""
    if data.startswith(b"\xd0\xcf\x11\xe0"):
        raise _DocumentError("docx_corrupt", "this is a legacy Word .doc (OLE2) file, not .docx; save it as .docx")
    entries = _zip_declared_entries(data)
    if entries is not None and entries > _ZIP_MAX_MEMBERS:
        raise _DocumentError("docx_too_large", f"zip bomb guard: {entries:,} members (limit {_ZIP_MAX_MEMBERS:,})")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as package:
            members = package.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        raise _DocumentError(
            "docx_corrupt",
            f"not a ZIP archive, which every .docx is ({_describe(exc)}; starts with {data[:8]!r})",
        ) from None
    if len(members) > _ZIP_MAX_MEMBERS:
        raise _DocumentError("docx_too_large", f"zip bomb guard: {len(members):,} members (limit {_ZIP_MAX_MEMBERS:,})")
    total = sum(member.file_size for member in members)
    if total > _ZIP_MAX_EXPANSION * len(data) and total > _ZIP_MAX_TOTAL_BYTES:
        raise _DocumentError(
            "docx_too_large",
            f"zip bomb guard: {len(data):,} bytes would expand to {total:,} bytes "
            f"(over {_ZIP_MAX_EXPANSION}x and over {_ZIP_MAX_TOTAL_BYTES // 2**20} MiB)",
        )
    for member in members:
        ratio = member.file_size / max(member.compress_size, 1)
        if member.file_size > _ZIP_MEMBER_RATIO_MIN_BYTES and ratio > _ZIP_MEMBER_MAX_RATIO:
            raise _DocumentError(
                "docx_too_large",
                f"zip bomb guard: {member.filename} would expand {ratio:,.0f}x to {member.file_size:,} bytes",
            )
    names = {member.filename for member in members}
    if "word/document.xml" not in names:
        raise _DocumentError("docx_corrupt", "a ZIP archive but not a Word document: word/document.xml is missing")


def _zip_declared_entries(data: bytes) -> int | None:
    """Read the member count from the end-of-central-directory record, before zipfile makes a ZipInfo each."""
    eocd = data.rfind(b"PK\x05\x06", max(0, len(data) - 65_557))
    if eocd < 0 or eocd + 22 > len(data):
        return None
    (entries,) = struct.unpack_from("<H", data, eocd + 10)
    return None if entries == 0xFFFF else entries  # 0xFFFF: the real count is in a ZIP64 record


def _docx_blocks(document: Any) -> Iterator[str]:
    from docx.table import Table

    for block in document.iter_inner_content():
        if isinstance(block, Table):
            yield from _docx_table_rows(block)
        else:
            yield block.text


def _docx_table_rows(table: Any) -> Iterator[str]:
    """One line per row with cells joined by " | "; a merged cell is listed once, not once per grid column."""
    try:
        rows = [list(row.cells) for row in table.rows]
    except Exception:  # malformed grid spans: fall back to the table's plain text
        yield " ".join(text.strip() for text in table._element.itertext() if text.strip())
        return
    for cells in rows:
        seen: list[Any] = []
        texts: list[str] = []
        for cell in cells:
            if any(cell._tc is other for other in seen):
                continue
            seen.append(cell._tc)
            texts.append(" ".join(cell.text.split()))
        if any(texts):
            yield " | ".join(texts)


# --- email --------------------------------------------------------------------------------------------------


def _eml_text(data: bytes, *, forced: str | None) -> str:
    try:
        message = BytesParser(policy=policy.default).parsebytes(data)
    except (RecursionError, MemoryError):
        raise
    except Exception as exc:
        raise _DocumentError("eml_corrupt", f"the email parser cannot read it: {_describe(exc)}") from None
    try:
        headers = _eml_headers(message)
        body = _eml_body(message, forced=forced)
    except (RecursionError, MemoryError):
        raise
    except Exception as exc:
        raise _DocumentError("eml_corrupt", f"its MIME structure cannot be read: {_describe(exc)}") from None
    if not headers and not body:
        raise _DocumentError("eml_corrupt", "no headers and no readable text body: is this an email?")
    return _normalise("\n".join([*headers, "", body] if body else headers)).strip()


def _eml_headers(message: Message) -> list[str]:
    lines: list[str] = []
    for name in ("Subject", "From", "To", "Date"):
        try:
            value = message.get(name)
        except Exception:  # a malformed header can make the structured header classes throw
            value = next((raw for key, raw in message.raw_items() if key.lower() == name.lower()), None)
        if value is not None and (text := " ".join(str(value).split())):
            lines.append(f"{name}: {text}")
    return lines


def _eml_body(message: Message, *, forced: str | None) -> str:
    """Prefer the text/plain body; fall back to the HTML body's visible text; attachments are never read."""
    if isinstance(message, EmailMessage):
        for kind in ("plain", "html"):
            try:
                part = message.get_body(preferencelist=(kind,))
            except Exception:
                part = None
            if part is not None and (text := _eml_part_text(part, forced=forced)):
                return text
    for part in message.walk():  # get_body found nothing usable: any inline text part will do
        inline_text = part.get_content_maintype() == "text" and part.get_content_disposition() != "attachment"
        if inline_text and (text := _eml_part_text(part, forced=forced)):
            return text
    return ""


def _eml_part_text(part: Message, *, forced: str | None) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes) or not payload.strip():
        return ""
    charset = part.get_content_charset()
    # The part's own declared charset beats source.encoding, which stands in for detection only.
    forced_here = None if charset else forced
    try:
        if part.get_content_subtype() == "html":
            return html_visible_text(_decode_html(payload, forced=forced_here, declared=charset)) or ""
        return _decode_text(payload, forced=forced_here, hint=charset).strip()
    except _DocumentError:
        return ""


# --- JSON / JSONL -------------------------------------------------------------------------------------------


def _parse_json(text: str, source: SourceSpec) -> list[ParsedDocument]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _DocumentError(
            "json_corrupt", f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise _DocumentError("json_corrupt", "the JSON is nested too deeply to parse") from None
    if isinstance(value, dict):
        records: list[Any] = [value]
    elif isinstance(value, list):
        records = value
    else:
        raise _DocumentError(
            "json_corrupt",
            f"top-level value is {_json_kind(value)}; expected an array of records or one object",
        )
    if not records:
        raise _DocumentError("empty", "the JSON array holds no records")
    keyed = [_json_record(record, index, source, "json") for index, record in enumerate(records)]
    return _distinct_keys([document for document, _ in keyed], [by_id for _, by_id in keyed])


def _parse_jsonl(text: str, source: SourceSpec) -> list[ParsedDocument]:
    documents: list[ParsedDocument] = []
    by_id: list[bool] = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines separate nothing and are not records
        index = len(documents)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            reason = f"line {line_number} is not valid JSON (column {exc.colno}: {exc.msg})"
            documents.append(_failed("jsonl", "json_corrupt", reason, str(index)))
            by_id.append(False)
            continue
        except RecursionError:
            reason = f"line {line_number} is nested too deeply to parse"
            documents.append(_failed("jsonl", "json_corrupt", reason, str(index)))
            by_id.append(False)
            continue
        document, keyed = _json_record(record, index, source, "jsonl", line_number)
        documents.append(document)
        by_id.append(keyed)
    if not documents:
        raise _DocumentError("empty", "the JSON Lines file holds no records")
    return _distinct_keys(documents, by_id)


def _distinct_keys(documents: list[ParsedDocument], by_id: list[bool]) -> list[ParsedDocument]:
    """Give every record of a file its own key, so no two share a doc_id and one row overwrites the other.

    Ids are not guaranteed unique (exports repeat them), and a record without a usable id falls back to its
    position, which can equal another record's numeric id (a broken line 2 is "1", as is the record with id 1).
    The first record carrying an id keeps it; a record keyed by position never takes an id away from one keyed
    by its own id; every other clash gets "@<index>" appended, which stays the same on every run.
    """
    taken: set[str] = set()
    keeps = [False] * len(documents)
    for index, (document, keyed) in enumerate(zip(documents, by_id, strict=True)):
        if keyed and document.record_key is not None and document.record_key not in taken:
            taken.add(document.record_key)
            keeps[index] = True
    distinct: list[ParsedDocument] = []
    for index, document in enumerate(documents):
        key = document.record_key
        if keeps[index] or key is None:
            distinct.append(document)
            continue
        while key in taken:
            key = f"{key}@{index}"
        taken.add(key)
        distinct.append(document if key == document.record_key else replace(document, record_key=key))
    return distinct


def _json_record(
    record: Any, index: int, source: SourceSpec, fmt: str, line_number: int | None = None
) -> tuple[ParsedDocument, bool]:
    """Parse one record; the flag says whether its key is its own id (True) or its position (False)."""
    where = f"line {line_number}" if line_number is not None else f"record {index}"
    if not isinstance(record, dict):
        reason = f"{where} is {_json_kind(record)}, not an object"
        return _failed(fmt, "json_not_object", reason, str(index)), False
    own_id = _json_id(record, source.id_field)
    key = str(index) if own_id is None else own_id
    return _json_record_text(record, key, where, source, fmt), own_id is not None


def _json_record_text(record: dict[str, Any], key: str, where: str, source: SourceSpec, fmt: str) -> ParsedDocument:
    value = _lookup(record, source.text_field)
    if value is _MISSING or value is None:
        state = "is null" if value is None else "is missing"
        reason = f"{where}: text field {source.text_field!r} {state}"
        return _failed(fmt, "json_missing_text", reason, key)
    if isinstance(value, bool | dict):
        reason = f"{where}: text field {source.text_field!r} holds {_json_kind(value)}, not text"
        return _failed(fmt, "json_bad_text", reason, key)
    if isinstance(value, list):
        if not all(isinstance(item, str) for item in value):
            reason = f"{where}: text field {source.text_field!r} holds a list of non-strings, not text"
            return _failed(fmt, "json_bad_text", reason, key)
        value = "\n".join(value)
    text = _normalise(value if isinstance(value, str) else str(value))
    if not text.strip():
        return _failed(fmt, "empty", f"{where}: text field {source.text_field!r} is blank", key)
    return ParsedDocument(key, text, fmt)


def _json_id(record: dict[str, Any], id_field: str | None) -> str | None:
    """The record's own key from id_field, or None when it has no usable one (the caller keys it by position)."""
    if not id_field:
        return None
    value = _lookup(record, id_field)
    if value is _MISSING or value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _lookup(record: Any, path: str) -> Any:
    """Follow a dotted path through objects (and list indices); a literal key containing dots wins."""
    if isinstance(record, dict) and path in record:
        return record[path]
    current = record
    for part in path.split("."):
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return _MISSING
    return current


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
