"""Few-shot prompt text for scoring with a small *base* language model.

A base model continues text; it does not follow chat instructions. So the prompt shows the format a few times
(labeled texts, documents with their field values) and the model's answer is read as the likelihood of each
allowed continuation. Each function returns plain text; the engine tokenizes it into reusable segments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from docroute.schemas.spec import ClassifySpec, ExtractSpec, FieldSpec, TaskSpec
from docroute.schemas.values import to_json_value

EXAMPLE_CHARS = 400
"""Few-shot example texts are cut to this many characters: the prompt is for format, not for long reading."""

TRUNCATION_MARKER = "\n[…]\n"
"""Stands where the middle of a document too long for the token budget was cut out."""

NO_VALUE = "n/a"
"""What examples show for an absent optional field, and the candidate the model can choose for it."""


def one_line(text: str, limit: int | None = None) -> str:
    """Collapse a text onto one line so a label marker after it cannot be confused with its content."""
    flat = " ".join(text.split())
    if limit is not None and len(flat) > limit:
        flat = flat[:limit].rsplit(" ", 1)[0] + " …"
    return flat


def field_title(field: FieldSpec) -> str:
    """Render a field name as the words a document would use: invoice_total → Invoice total."""
    words = field.name.replace("_", " ").strip()
    return words[:1].upper() + words[1:]


def _header(task: TaskSpec, specific: str) -> list[str]:
    lines = [part.strip() for part in (task.instructions, specific) if part and part.strip()]
    return [*lines, ""] if lines else []


def select_examples(classify: ClassifySpec, extra: Sequence[tuple[str, str]], count: int) -> list[tuple[str, str]]:
    """Pick up to `count` labeled examples round-robin over labels, so every label is shown before any twice."""
    pools: dict[str, list[str]] = {label.name: list(label.examples) for label in classify.labels}
    for text, label in extra:
        if label in pools:
            pools[label].append(text)
    chosen: list[tuple[str, str]] = []
    depth = 0
    while len(chosen) < count and any(len(pool) > depth for pool in pools.values()):
        for label in classify.labels:
            pool = pools[label.name]
            if depth < len(pool) and len(chosen) < count:
                chosen.append((pool[depth], label.name))
        depth += 1
    return chosen


def classify_prefix(task: TaskSpec, examples: Sequence[tuple[str, str]]) -> str:
    """Instructions, the label list and labeled examples: the fixed part of every classification prompt."""
    classify = task.classify
    assert classify is not None
    texts = {label.name: label.text for label in classify.labels}
    lines = _header(task, classify.instructions)
    lines.append("Each text below is labeled with exactly one of these labels:")
    for label in classify.labels:
        detail = f" ({one_line(label.description, 160)})" if label.description else ""
        lines.append(f"- {label.text}{detail}")
    lines.append("")
    for text, label in examples:
        lines.append(f"Text: {one_line(text, EXAMPLE_CHARS)}")
        lines.append(f"Label: {texts[label]}")
        lines.append("")
    return "\n".join(lines)


def classify_document(text: str) -> str:
    """The document part of a classification prompt (the question follows as its own segment)."""
    return f"Text: {one_line(text)}\n"


CLASSIFY_QUESTION = "Label:"


def label_continuation(label_text: str) -> str:
    """What the model must continue with for a label; the newline marks the label's end."""
    return f" {label_text}\n"


def _render_value(field: FieldSpec, value: Any) -> str:
    if value is None or value == []:
        return NO_VALUE
    if isinstance(value, list):
        return "; ".join(str(v) for v in value)
    return one_line(str(to_json_value(value)))


def extract_prefix(task: TaskSpec, extract: ExtractSpec) -> str:
    """Instructions, the field list and worked examples: the fixed part of every extraction prompt."""
    lines = _header(task, extract.instructions)
    lines.append("Each document below is followed by the values of these fields, copied from the document:")
    for field in extract.fields:
        detail = f": {one_line(field.description, 160)}" if field.description else ""
        lines.append(f"- {field_title(field)}{detail}")
    lines.append("")
    for example in extract.examples:
        lines.append("Document:")
        lines.append(example.text.strip()[: EXAMPLE_CHARS * 3])
        lines.append("---")
        for field in extract.fields:
            lines.append(f"{field_title(field)}: {_render_value(field, example.values.get(field.name))}")
        lines.append("")
    return "\n".join(lines) + "\n"


def extract_document(text: str) -> str:
    """The document part of an extraction prompt; its lines are kept, since layout carries meaning in forms."""
    return f"Document:\n{text.strip()}\n---\n"


def extract_question(field: FieldSpec) -> str:
    return f"{field_title(field)}:"


def value_continuation(surface: str) -> str:
    return f" {one_line(surface)}\n"


def truncate_tokens(tokens: Sequence[int], budget: int, marker: Sequence[int]) -> tuple[list[int], bool]:
    """Keep a document's head (two thirds) and tail (one third) around `marker` when it exceeds `budget` tokens.

    Openings name the parties; endings hold totals and signatures.
    """
    tokens = list(tokens)
    if len(tokens) <= budget:
        return tokens, False
    keep = max(budget - len(marker), 2)
    head = keep * 2 // 3
    return tokens[:head] + list(marker) + tokens[len(tokens) - (keep - head) :], True
