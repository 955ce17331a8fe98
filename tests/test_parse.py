"""Tests for tasks/ingest/parse.py: every test builds a real file in memory, so the parsers meet genuine bytes."""

from __future__ import annotations

import io
import json
import random
import re
import time
import zipfile
from email.message import EmailMessage
from typing import Any

import docx
import pytest
from fpdf import FPDF
from fpdf.enums import EncryptionMethod

from docroute.schemas.spec import SourceSpec
from docroute.tasks.ingest.parse import (
    ERROR_CODES,
    SUPPORTED_FORMATS,
    ParsedDocument,
    detect_format,
    parse_document,
)


def _source(**options: Any) -> SourceSpec:
    return SourceSpec(url="memory://docs", **options)


def _parse(data: bytes, uri: str, **options: Any) -> list[ParsedDocument]:
    documents = parse_document(data, uri=uri, source=_source(**options))
    assert documents, "parse_document must return at least one document"
    for document in documents:
        assert (document.text is None) != (document.error is None)
        if document.error is not None:
            assert document.error_code in ERROR_CODES
            assert document.error.startswith(f"{document.error_code}: ")
    return documents


def _one(data: bytes, uri: str, **options: Any) -> ParsedDocument:
    documents = _parse(data, uri, **options)
    assert len(documents) == 1
    assert documents[0].record_key is None
    return documents[0]


def _text(data: bytes, uri: str, **options: Any) -> str:
    document = _one(data, uri, **options)
    assert document.error is None, document.error
    assert document.text is not None
    return document.text


def _error(data: bytes, uri: str, code: str, **options: Any) -> str:
    document = _one(data, uri, **options)
    assert document.error_code == code, document.error
    assert document.text is None
    assert document.error is not None
    return document.error


# --- builders -----------------------------------------------------------------------------------------------


def _pdf(
    text: str | None = None,
    *,
    user_password: str | None = None,
    method: EncryptionMethod = EncryptionMethod.RC4,
    rectangle: bool = False,
) -> bytes:
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    if text:
        pdf.multi_cell(w=0, text=text)
    if rectangle:
        pdf.rect(20, 20, 60, 40, style="DF")
    if user_password is not None:
        pdf.set_encryption(owner_password="owner-pw", user_password=user_password, encryption_method=method)
    return bytes(pdf.output())


def _docx(paragraphs: list[str], table: list[list[str]] | None = None, after: str | None = None) -> bytes:
    document = docx.Document()
    for paragraph in paragraphs:
        document.add_paragraph(paragraph)
    if table:
        grid = document.add_table(rows=len(table), cols=len(table[0]))
        for row, values in zip(grid.rows, table, strict=True):
            for cell, value in zip(row.cells, values, strict=True):
                cell.text = value
    if after:
        document.add_paragraph(after)
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def zip_bomb() -> bytes:
    """A .docx-shaped ZIP whose document.xml inflates to 200 MiB of zeros, built in chunks to stay light."""
    buffer = io.BytesIO()
    chunk = b"\0" * (4 * 1024 * 1024)
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        with archive.open("word/document.xml", "w", force_zip64=True) as member:
            for _ in range(50):
                member.write(chunk)
    return buffer.getvalue()


def _email(subject: str, plain: str | None = None, html: str | None = None) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = "Alice Example <alice@example.com>"
    message["To"] = "bob@example.com"
    message["Date"] = "Mon, 03 Jun 2024 10:00:00 +0000"
    if plain is not None:
        message.set_content(plain)
        if html is not None:
            message.add_alternative(html, subtype="html")
    elif html is not None:
        message.set_content(html, subtype="html")
    return message


# --- detect_format ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("notes.txt", "txt"),
        ("server.LOG", "txt"),
        ("a/b/readme.text", "txt"),
        ("README.md", "md"),
        ("guide.Markdown", "md"),
        ("page.HTM", "html"),
        ("page.html", "html"),
        ("page.xhtml", "html"),
        ("s3://bucket/dir/report.PDF", "pdf"),
        ("s3://bucket/report.pdf?versionId=abc.txt", "pdf"),
        ("https://host/letter.docx#frag", "docx"),
        ("C:\\mail\\message.eml", "eml"),
        ("data.json", "json"),
        ("data.jsonl", "jsonl"),
        ("data.NDJSON", "jsonl"),
        ("archive.tar.gz", "unknown"),
        ("legacy.doc", "unknown"),
        ("Makefile", "unknown"),
        (".bashrc", "unknown"),
    ],
)
def test_detect_format_by_extension(uri: str, expected: str) -> None:
    assert detect_format(uri, "auto") == expected


def test_detect_format_declared_wins_over_extension() -> None:
    assert detect_format("scan.pdf", "txt") == "txt"
    assert detect_format("no-extension", "jsonl") == "jsonl"
    assert detect_format("x.txt", "rtf") == "unknown"
    assert set(SUPPORTED_FORMATS) >= {detect_format(f"x.{fmt}", "auto") for fmt in SUPPORTED_FORMATS} - {"unknown"}
    assert {detect_format(f"x.{ext}", "auto") for ext in ("png", "jpg", "jpeg", "tif", "tiff", "webp")} == {"image"}
    assert detect_format("scan.bin", "image") == "image"


def test_unsupported_extension_names_it_and_the_supported_list() -> None:
    error = _error(b"{\\rtf1 hello}", "letter.rtf", "unsupported_format")
    assert "'.rtf'" in error
    assert ".docx" in error
    assert ".jsonl" in error
    assert _one(b"x", "letter.rtf").format == "unknown"
    assert "no extension" in _error(b"hello", "README", "unsupported_format")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("file:///docs/Invoice #42.txt", "txt"),
        ("file:///docs/what?.md", "md"),
        ("file:///docs/notes.txt#draft", "unknown"),
        ("/docs/a#b?.pdf", "pdf"),
        ("s3://bucket/Invoice #42 (final?).docx", "docx"),
        ("s3://bucket/report.pdf?versionId=abc.txt", "pdf"),
        ("https://host/page.html?lang=en#top", "html"),
    ],
)
def test_hash_and_question_mark_in_a_file_name_are_part_of_it(uri: str, expected: str) -> None:
    """Listings give names verbatim: "Invoice #42.txt" once became an `unsupported_format` row ("no extension")."""
    assert detect_format(uri, "auto") == expected


def test_unsupported_reason_names_the_literal_extension_of_a_local_file() -> None:
    assert "'.txt#draft'" in _error(b"hello", "file:///docs/notes.txt#draft", "unsupported_format")


# --- whole-file checks and text decoding --------------------------------------------------------------------


def test_txt_utf8() -> None:
    assert _text("Hello, wörld — ünïcode ✓\r\nsecond line\n".encode(), "a.txt") == (
        "Hello, wörld — ünïcode ✓\nsecond line\n"
    )


def test_txt_utf8_with_bom() -> None:
    assert _text(b"\xef\xbb\xbfcaf\xc3\xa9 au lait", "a.txt") == "café au lait"


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be", "utf-32"])
def test_txt_utf16_and_utf32_with_bom(codec: str) -> None:
    data = "Grüße aus Köln\r\n日本語".encode(codec)
    if codec == "utf-16-be":
        data = b"\xfe\xff" + data
    assert _text(data, "a.txt") == "Grüße aus Köln\n日本語"


def test_utf16_without_bom_is_not_mistaken_for_binary() -> None:
    assert _text("Windows export, plain ASCII mostly.".encode("utf-16-le"), "a.txt") == (
        "Windows export, plain ASCII mostly."
    )


@pytest.mark.parametrize(
    ("text", "codec"),
    [
        ("café naïve", "cp1252"),
        ("Le café était très naïve, déjà vu.\n", "latin-1"),
        ("Smart “quotes” — café … 5 €", "cp1252"),
        ("こんにちは世界、日本語のテキストです。", "shift_jis"),
        ("Привет мир, это обычный русский текст.", "cp1251"),
        ("Zażółć gęślą jaźń, powiedział Łukasz w Łodzi.", "cp1250"),
        ("Καλημέρα κόσμε, αυτό είναι ελληνικό κείμενο.", "cp1253"),
    ],
)
def test_legacy_encodings_decode_correctly(text: str, codec: str) -> None:
    assert _text(text.encode(codec), "a.txt") == text


@pytest.mark.parametrize(
    "text",
    [
        "Crème fraîche, garçon, déjà vu: whisk the eggs with sugar and bake the cake.",
        "Déjà, très, après, où, là, voilà, à côté, août, maïs, Noël.",
        "Il caffè è già pronto, perché non vieni più tardi? Città, virtù.",
        "El niño comió una piña en el jardín; ¿qué más quería?",
        "Die Straße ist naß; Öl läuft über die Fußgängerzone.",
        "Før vi går, må vi spise smørbrød og drikke øl på kroen. L·l, l’été – 5 €",
    ],
)
@pytest.mark.parametrize("codec", ["latin-1", "cp1252"])
def test_western_legacy_text_is_not_read_as_another_code_page(text: str, codec: str) -> None:
    """charset-normalizer read latin-1 French as Baltic cp1257 ("Crčme fraīche, déją") and Italian as Mac
    Central European ("caffŤ"): garbage the model would have classified with full confidence."""
    try:
        data = text.encode(codec)
    except UnicodeEncodeError:
        data = text.encode("cp1252")
    assert _text(data, "a.txt") == text


def test_forced_encoding_is_honoured_and_failures_are_precise() -> None:
    assert _text("naïve".encode("cp1252"), "a.txt", encoding="cp1252") == "naïve"
    assert _text("\ufeffBOM".encode(), "a.txt", encoding="utf-8") == "BOM"
    error = _error(b"caf\xe9", "a.txt", "decode", encoding="utf-8")
    assert "e9" in error
    assert "offset 3" in error
    assert "not an encoding" in _error(b"abc", "a.txt", "decode", encoding="no-such-codec")


def test_binary_junk_named_txt_is_a_binary_error() -> None:
    junk = random.Random(7).randbytes(4096)
    error = _error(junk, "photo.txt", "binary")
    assert "control bytes" in error
    assert "%" in error
    # valid UTF-8 that is mostly control characters is still binary
    assert "binary data" in _error(bytes(range(1, 32)) * 20 + b"ok", "a.txt", "binary")


def test_text_is_normalised() -> None:
    decomposed = "cafe\u0301\r\nline\rend\x00!"
    assert _text(decomposed.encode(), "a.txt") == "café\nline\nend!"


def test_empty_file() -> None:
    assert "0 bytes" in _error(b"", "a.txt", "empty")


@pytest.mark.parametrize("uri", ["a.txt", "a.pdf", "a.docx", "a.json", "a.html", "a.eml"])
def test_whitespace_only_file_is_empty_whatever_the_format(uri: str) -> None:
    assert "only whitespace" in _error(b" \n\t\r\n  ", uri, "empty")


def test_whitespace_only_after_decoding_is_empty() -> None:
    _error("   \n  ".encode("utf-16"), "a.txt", "empty")


def test_over_max_bytes() -> None:
    error = _error(b"x" * 101, "a.txt", "too_large", max_bytes=100)
    assert "101" in error
    assert "100" in error
    assert _text(b"x" * 100, "a.txt", max_bytes=100) == "x" * 100


def test_markdown_syntax_is_dropped_words_and_lines_kept() -> None:
    markdown = "# Title\n\n* item one\n* item **two** with [a link](https://x.example)\n\n```py\nprint(1)\n```\n"
    document = _one(markdown.encode(), "notes.md")
    assert document.format == "md"
    assert document.text is not None
    lines = [line for line in document.text.splitlines() if line]
    assert lines == ["Title", "* item one", "* item two with a link", "print(1)"]


# --- HTML ---------------------------------------------------------------------------------------------------

_HTML_PAGE = """<!DOCTYPE html>
<html><head>
  <title>Quarterly   report</title>
  <meta charset="utf-8"><style>body { color: red }</style>
  <script>var tracking = "SCRIPT_SECRET";</script>
</head>
<body>
  <h1>Revenue
      grew</h1>
  <p>Sales were <b>up</b> 12%&nbsp;this quarter.<br>New line here.</p>
  <!-- COMMENT_SECRET -->
  <div hidden>HIDDEN_ATTR</div>
  <div aria-hidden="true">ARIA_HIDDEN</div>
  <span style="display: none">DISPLAY_NONE</span>
  <p style="Visibility:Hidden">VISIBILITY_HIDDEN</p>
  <noscript>NOSCRIPT_TEXT</noscript>
  <template><p>TEMPLATE_TEXT</p></template>
  <svg><title>SVG_TITLE</title><text>SVG_TEXT</text></svg>
  <iframe src="x">IFRAME_TEXT</iframe>
  <table><tr><th>Region</th><th>Sales</th></tr><tr><td>North</td><td>10</td></tr></table>
  <ul><li>first</li><li>second</li></ul>
  <pre>line one
line two</pre>
  <script type="application/ld+json">{"SCRIPT_JSON": 1}</script>
</body></html>
"""


def test_html_visible_text_only() -> None:
    text = _text(_HTML_PAGE.encode(), "page.html")
    lines = text.split("\n")
    assert lines[0] == "Quarterly report"
    assert "Revenue grew" in lines
    assert "Sales were up 12% this quarter." in lines
    assert "New line here." in lines
    assert "Region | Sales" in lines
    assert "North | 10" in lines
    assert lines[lines.index("first") + 1] == "second"
    assert "line one" in lines
    assert "line two" in lines
    for secret in (
        "SCRIPT_SECRET",
        "SCRIPT_JSON",
        "color: red",
        "COMMENT_SECRET",
        "HIDDEN_ATTR",
        "ARIA_HIDDEN",
        "DISPLAY_NONE",
        "VISIBILITY_HIDDEN",
        "NOSCRIPT_TEXT",
        "TEMPLATE_TEXT",
        "SVG_TITLE",
        "SVG_TEXT",
        "IFRAME_TEXT",
    ):
        assert secret not in text, secret
    assert "" not in lines


def test_html_all_script_is_html_no_text() -> None:
    page = b"<html><head><title>App</title><script>render()</script></head><body><script>x()</script></body>"
    assert "no visible text" in _error(page, "app.html", "html_no_text")


def test_html_meta_charset_is_respected() -> None:
    page = '<html><head><meta charset="iso-8859-1"></head><body><p>Crème brûlée – €5</p></body></html>'
    assert _text(page.encode("cp1252"), "menu.htm") == "Crème brûlée – €5"
    koi8 = '<meta http-equiv="Content-Type" content="text/html; charset=koi8-r"><p>Привет</p>'
    assert _text(koi8.encode("koi8-r"), "ru.html") == "Привет"


def test_xhtml_with_xml_declaration() -> None:
    page = (
        '<?xml version="1.0" encoding="utf-8"?>\n<html xmlns="http://www.w3.org/1999/xhtml">'
        "<head><title>X</title></head><body><p>Über</p></body></html>"
    )
    assert _text(page.encode(), "doc.xhtml") == "X\nÜber"


# --- PDF ----------------------------------------------------------------------------------------------------


def test_pdf_text_is_extracted() -> None:
    document = _one(_pdf("Invoice 4711 from ACME GmbH, total due 99.50 EUR"), "invoice.pdf")
    assert document.format == "pdf"
    assert document.text is not None
    assert "Invoice 4711 from ACME GmbH" in document.text


def test_truncated_pdf_says_it_was_cut_off() -> None:
    """pypdf's "Stream has ended unexpectedly" does not tell the owner to fetch the file again; the reason does."""
    data = _pdf("Some text that will be cut off " * 20)
    for cut in (len(data) // 3, len(data) // 2, len(data) - 200):
        error = _error(data[:cut], "cut.pdf", "pdf_corrupt")
        assert "truncated" in error
        assert "%%EOF" in error
    assert "truncated" not in _error(b"%PDF-1.7\n" + b"not an object graph\n" * 50 + b"%%EOF\n", "x.pdf", "pdf_corrupt")


def test_truncated_pdf_is_an_error_or_partial_text() -> None:
    data = _pdf("Some text that will be cut off")
    document = _one(data[: len(data) // 2], "cut.pdf")
    if document.error is not None:
        assert document.error_code in {"pdf_corrupt", "pdf_no_text"}
        assert len(document.error) > len(f"{document.error_code}: ")
    else:
        assert document.text


def test_garbage_with_pdf_header_is_pdf_corrupt() -> None:
    error = _error(b"%PDF-1.7\n" + b"this is not a pdf object graph\n" * 50, "broken.pdf", "pdf_corrupt")
    assert "pypdf" in error


def test_not_a_pdf_at_all_is_pdf_corrupt() -> None:
    assert "no %PDF- header" in _error(b"<html>oops</html>", "fake.pdf", "pdf_corrupt")


def test_pdf_with_user_password_is_pdf_encrypted() -> None:
    error = _error(_pdf("Top secret", user_password="secret"), "locked.pdf", "pdf_encrypted")
    assert "password" in error
    aes = _pdf("Top secret", user_password="secret", method=EncryptionMethod.AES_128)
    _error(aes, "locked.pdf", "pdf_encrypted")


@pytest.mark.parametrize("method", [EncryptionMethod.RC4, EncryptionMethod.AES_256])
def test_pdf_encrypted_with_empty_user_password_opens(method: EncryptionMethod) -> None:
    assert "Readable by anyone" in _text(_pdf("Readable by anyone", user_password="", method=method), "a.pdf")


def test_pdf_without_text_layer_is_ocrd_and_a_blank_scan_is_ocr_no_text() -> None:
    # OCR renders the page and finds only a rectangle: a reasoned error, not an empty document (tests/test_ocr.py
    # reads real scanned pages; without the [ocr] extra the same file is pdf_no_text)
    from docroute.tasks.ingest.ocr import ocr_available

    code = "ocr_no_text" if ocr_available() else "pdf_no_text"
    error = _error(_pdf(rectangle=True), "scan.pdf", code)
    assert "OCR" in error


def test_damaged_pdf_is_recovered_without_logging_warnings(caplog: pytest.LogCaptureFixture) -> None:
    damaged = re.sub(rb"startxref\s+\d+", b"startxref\n999999", _pdf("Recovered text"))
    with caplog.at_level("WARNING"):
        assert _text(damaged, "damaged.pdf") == "Recovered text"
    assert not [record for record in caplog.records if record.name.startswith("pypdf")]


# --- DOCX ---------------------------------------------------------------------------------------------------


def test_docx_paragraphs_and_table_in_document_order() -> None:
    data = _docx(
        ["Employment contract", "Between ACME and Jane Doe."],
        table=[["Role", "Salary"], ["Engineer", "€70,000"]],
        after="Signed in Berlin.",
    )
    document = _one(data, "contract.docx")
    assert document.format == "docx"
    assert document.text == (
        "Employment contract\nBetween ACME and Jane Doe.\nRole | Salary\nEngineer | €70,000\nSigned in Berlin."
    )


def test_docx_zip_bomb_is_refused_without_decompressing(zip_bomb: bytes) -> None:
    assert len(zip_bomb) < 2 * 1024 * 1024
    started = time.perf_counter()
    error = _error(zip_bomb, "bomb.docx", "docx_too_large")
    assert time.perf_counter() - started < 0.5
    assert "zip bomb guard" in error


def test_docx_with_too_many_members_is_refused() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index in range(10_001):
            archive.writestr(f"m/{index}", b"")
    assert "10,001 members" in _error(buffer.getvalue(), "many.docx", "docx_too_large")


def test_non_zip_named_docx_is_docx_corrupt() -> None:
    assert "not a ZIP" in _error(b"Just some text, not a Word file.", "fake.docx", "docx_corrupt")
    ole = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 512
    assert "legacy Word .doc" in _error(ole, "old.docx", "docx_corrupt")


def test_zip_without_word_document_is_docx_corrupt() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("hello.txt", "hi")
    assert "word/document.xml" in _error(buffer.getvalue(), "other.docx", "docx_corrupt")


def test_docx_with_broken_xml_is_docx_corrupt() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(_docx(["hello"]))) as source, zipfile.ZipFile(buffer, "w") as target:
        for item in source.infolist():
            data = b"<w:document><unclosed" if item.filename == "word/document.xml" else source.read(item)
            target.writestr(item, data)
    assert "python-docx" in _error(buffer.getvalue(), "broken.docx", "docx_corrupt")


# --- email --------------------------------------------------------------------------------------------------


def test_eml_plain() -> None:
    message = _email("Invoice ✓ due", plain="Please pay invoice 17 by Friday.\n")
    text = _text(message.as_bytes(), "mail.eml")
    assert text.split("\n")[:4] == [
        "Subject: Invoice ✓ due",
        "From: Alice Example <alice@example.com>",
        "To: bob@example.com",
        "Date: Mon, 03 Jun 2024 10:00:00 +0000",
    ]
    assert text.endswith("Please pay invoice 17 by Friday.")


def test_eml_multipart_alternative_prefers_plain() -> None:
    message = _email("Hi", plain="PLAIN body wins", html="<p>HTML body loses</p>")
    message.add_attachment(b"%PDF-1.4 ATTACHMENT", maintype="application", subtype="pdf", filename="a.pdf")
    text = _text(message.as_bytes(), "mail.eml")
    assert "PLAIN body wins" in text
    assert "HTML body loses" not in text
    assert "ATTACHMENT" not in text


def test_eml_html_only_uses_visible_text() -> None:
    html = "<html><head><style>p{}</style></head><body><p>Visible <i>words</i></p><script>s()</script></body>"
    text = _text(_email("Newsletter", html=html).as_bytes(), "news.eml")
    assert text.endswith("Visible words")
    assert "s()" not in text
    assert "p{}" not in text


def test_eml_legacy_charset_body() -> None:
    raw = (
        b"Subject: =?iso-8859-1?q?Caf=E9?=\r\nFrom: a@example.com\r\n"
        b'Content-Type: text/plain; charset="iso-8859-1"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n'
        b"Cr\xe8me br\xfbl\xe9e\r\n"
    )
    text = _text(raw, "m.eml")
    assert text.startswith("Subject: Café\nFrom: a@example.com")
    assert text.endswith("Crème brûlée")


def test_broken_mime_still_yields_text() -> None:
    raw = (
        b'Subject: broken\r\nContent-Type: multipart/mixed; boundary="XYZ"\r\n\r\n'
        b"--XYZ\r\nContent-Type: text/plain\r\n\r\nstill readable\r\n"  # no closing boundary
    )
    text = _text(raw, "broken.eml")
    assert "Subject: broken" in text
    assert "still readable" in text


# --- JSON / JSONL -------------------------------------------------------------------------------------------


def test_json_array_records_with_one_missing_text() -> None:
    records = [{"text": "first"}, {"title": "no text here"}, {"text": 42}]
    documents = _parse(json.dumps(records).encode(), "batch.json")
    assert [d.record_key for d in documents] == ["0", "1", "2"]
    assert [d.text for d in documents] == ["first", None, "42"]
    assert documents[1].error_code == "json_missing_text"
    assert documents[1].error is not None
    assert "'text'" in documents[1].error
    assert all(d.format == "json" for d in documents)


def test_json_dotted_text_field_and_id_field() -> None:
    records = [
        {"meta": {"id": "doc-a"}, "body": {"text": "alpha"}},
        {"meta": {"id": 7}, "body": {"text": {"nested": True}}},
        {"meta": {}, "body": {"text": None}},
        {"meta": {"id": "doc-d"}, "body": {"text": "   "}},
    ]
    documents = _parse(json.dumps(records).encode(), "b.json", text_field="body.text", id_field="meta.id")
    assert [d.record_key for d in documents] == ["doc-a", "7", "2", "doc-d"]
    assert documents[0].text == "alpha"
    assert [d.error_code for d in documents[1:]] == ["json_bad_text", "json_missing_text", "empty"]


def test_json_single_object_is_one_record() -> None:
    documents = _parse(b'{"id": "x1", "text": "only one"}', "one.json", id_field="id")
    assert documents == [ParsedDocument("x1", "only one", "json")]


def test_invalid_json_file_is_json_corrupt() -> None:
    assert "line 1 column" in _error(b'[{"text": "a"},', "bad.json", "json_corrupt")
    assert "a string" in _error(b'"just a string"', "s.json", "json_corrupt")
    assert "no records" in _error(b"[]", "e.json", "empty")


def test_jsonl_broken_line_fails_alone() -> None:
    lines = [
        json.dumps({"id": "a", "text": "line one"}),
        '{"id": "b", "text": "cut off',
        "",
        json.dumps({"id": "c", "text": "line three"}),
        json.dumps(["not", "an", "object"]),
    ]
    documents = _parse("\n".join(lines).encode(), "rows.jsonl", id_field="id")
    assert [d.record_key for d in documents] == ["a", "1", "c", "3"]
    assert [d.text for d in documents] == ["line one", None, "line three", None]
    assert documents[1].error_code == "json_corrupt"
    assert documents[1].error is not None
    assert "line 2" in documents[1].error
    assert documents[3].error_code == "json_not_object"
    assert all(d.format == "jsonl" for d in documents)


def test_record_keys_stay_unique_when_ids_repeat_or_meet_positions() -> None:
    """Keys make doc_ids: two records with one key became one row and the other document was lost.

    A broken line 2 is keyed by position as "1", the id of line 1; the record whose id repeats an earlier one
    keeps its own row. Records keyed by their own id keep it; only the clashing ones get "@<index>".
    """
    lines = [
        json.dumps({"id": 1, "text": "first"}),
        '{"id": 2, "text": "cut',
        json.dumps({"id": 2, "text": "second"}),
        json.dumps({"id": 1, "text": "repeat of one"}),
        json.dumps({"text": "no id, position 4"}),
        json.dumps({"id": "4", "text": "id four, after the record at position 4"}),
    ]
    documents = _parse("\n".join(lines).encode(), "rows.jsonl", id_field="id")
    keys = [d.record_key for d in documents]
    assert keys == ["1", "1@1", "2", "1@3", "4@4", "4"]
    assert len(set(keys)) == len(documents)
    assert [d.text for d in documents] == [
        "first",
        None,
        "second",
        "repeat of one",
        "no id, position 4",
        "id four, after the record at position 4",
    ]
    array = json.dumps([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}, {"id": "a@1", "text": "z"}])
    assert [d.record_key for d in _parse(array.encode(), "rows.json", id_field="id")] == ["a", "a@1@1", "a@1"]


def test_json_files_that_are_blank_once_decoded_are_empty() -> None:
    _error(b"\x00" + b" " * 50 + b"\n", "blank.jsonl", "empty")
    _error(b"\x00" + b" " * 50, "blank.json", "empty")


def test_jsonl_in_legacy_encoding() -> None:
    data = '{"text": "café"}\n{"text": "naïve"}\n'.encode("cp1252")
    assert [d.text for d in _parse(data, "rows.ndjson")] == ["café", "naïve"]


# --- robustness ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["x.txt", "x.md", "x.html", "x.pdf", "x.docx", "x.eml", "x.json", "x.jsonl"])
def test_random_bytes_never_raise(uri: str) -> None:
    rng = random.Random(uri)
    for size in (1, 7, 300, 5000):
        documents = _parse(rng.randbytes(size), uri)
        assert all(d.format == detect_format(uri, "auto") for d in documents)


def test_deeply_nested_input_is_an_error_not_a_crash() -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    _error(nested, "deep.json", "json_corrupt")
    html = b"<div>" * 20_000 + b"deep text" + b"</div>" * 20_000
    document = _one(html, "deep.html")
    assert document.error is not None or "deep text" in (document.text or "")
