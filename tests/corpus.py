"""Build small, real document corpora in a folder for flow tests (every format, plus broken files)."""

from __future__ import annotations

import json
from email.message import EmailMessage
from pathlib import Path

SPORTS = "The striker scored twice as the home side won the cup final in extra time."
WEATHER = "Heavy rain and strong winds are expected across the coast tonight, with snow on the hills."
COOKING = "Whisk the eggs with sugar, fold in the flour and bake the cake for thirty minutes."

TOPIC_EXAMPLES = {
    "sports": [
        "The tennis champion lost in straight sets at the open.",
        "Our goalkeeper saved a penalty in the last minute of the match.",
        "She won gold in the swimming relay at the championships.",
    ],
    "weather": [
        "Temperatures will drop below freezing with snow in the hills.",
        "A heatwave will bring highs of 38 degrees this weekend.",
        "Thunderstorms may cause flooding in low-lying areas tomorrow.",
    ],
    "cooking": [
        "Simmer the tomato sauce with garlic and basil for twenty minutes.",
        "Knead the dough and let it rise for an hour before baking.",
        "Fry the onions slowly until they caramelise, then add the stock.",
    ],
}


def _pdf(text: str) -> bytes:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.multi_cell(0, 8, text)
    return bytes(pdf.output())


def _docx(path: Path, text: str) -> None:
    from docx import Document

    document = Document()
    document.add_paragraph(text)
    document.save(str(path))


def build_topic_corpus(folder: Path) -> dict[str, str | None]:
    """Write one document per format and every kind of broken file; returns {file or file#record: gold label}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text(SPORTS + "\n", encoding="utf-8")
    (folder / "b.md").write_text(f"# Forecast\n\n{WEATHER}\n", encoding="utf-8")
    (folder / "c.html").write_text(
        f"<html><head><title>Recipe</title><script>var t = 'football match report';</script></head>"
        f"<body><p>{COOKING}</p><div hidden>The football team won the league.</div></body></html>",
        encoding="utf-8",
    )
    message = EmailMessage()
    message["Subject"] = "Weekend outlook"
    message["From"] = "news@example.com"
    message.set_content(WEATHER)
    (folder / "d.eml").write_bytes(bytes(message))
    (folder / "e.pdf").write_bytes(_pdf(SPORTS))
    _docx(folder / "f.docx", COOKING)
    records = [
        {"id": "r1", "body": {"text": SPORTS}},
        {"id": "r2", "body": {"text": COOKING}},
        {"id": "r3", "body": {"title": "no text here"}},
    ]
    (folder / "records.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    (folder / "corrupt.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\ngarbage garbage\n%%EO")
    (folder / "junk.txt").write_bytes(bytes(range(256)) * 4)
    (folder / "empty.txt").write_bytes(b"")
    (folder / "big.txt").write_text("lorem ipsum " * 10000, encoding="utf-8")
    (folder / "notes.xyz").write_text("an unsupported format", encoding="utf-8")
    (folder / ".hidden.txt").write_text("dotfiles are skipped", encoding="utf-8")
    return {
        "a.txt": "sports",
        "b.md": "weather",
        "c.html": "cooking",
        "d.eml": "weather",
        "e.pdf": "sports",
        "f.docx": "cooking",
        "records.jsonl#r1": "sports",
        "records.jsonl#r2": "cooking",
        "records.jsonl#r3": None,
        "corrupt.pdf": None,
        "junk.txt": None,
        "empty.txt": None,
        "big.txt": None,
        "notes.xyz": None,
    }


def topic_job_yaml(
    source: Path,
    output: Path,
    *,
    extra: str = "",
    shard_size: int = 4,
    name: str = "topics",
    text_field: str = "body.text",
    max_bytes: int = 60000,
) -> str:
    labels = "\n".join(
        f"      - name: {name}\n        description: texts about {name}\n        examples:\n"
        + "\n".join(f"          - {json.dumps(t)}" for t in texts)
        for name, texts in TOPIC_EXAMPLES.items()
    )
    return f"""name: {name}
source:
  url: {source}
  text_field: {text_field}
  id_field: id
  max_bytes: {max_bytes}
task:
  instructions: Short news and recipe snippets.
  classify:
    labels:
{labels}
small_model:
  engine: llamacpp
  classify_strategy: label_scoring
output:
  url: {output}
shard_size: {shard_size}
{extra}
"""
