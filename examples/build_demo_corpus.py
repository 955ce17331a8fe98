"""Rebuild the bundled demo corpora (maintainers only; the outputs are committed).

Support messages are a sample of BANKING77 (Casanueva et al. 2020, CC BY 4.0) read from ../shared/datasets;
the invoices were written for this project. Run from the repository root:
    python examples/build_demo_corpus.py
"""

from __future__ import annotations

import csv
import json
import random
import re
from email.message import EmailMessage
from pathlib import Path

HERE = Path(__file__).parent
BANKING77 = HERE.parent.parent / "shared" / "datasets" / "banking77" / "train.csv"
INTENTS = [
    "card_arrival",
    "lost_or_stolen_card",
    "exchange_rate",
    "pin_blocked",
    "cash_withdrawal_charge",
    "transfer_not_received_by_recipient",
]


def build_support() -> None:
    rows = [r for r in csv.DictReader(BANKING77.open(encoding="utf-8")) if r["category"] in INTENTS]
    random.Random(77).shuffle(rows)
    by_label: dict[str, list[str]] = {label: [] for label in INTENTS}
    for row in rows:
        by_label[row["category"]].append(row["text"].strip())
    examples = [(text, label) for label in INTENTS for text in by_label[label][:10]]
    with (HERE / "data" / "support_examples.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(examples)
    docs = [(text, label) for label in INTENTS for text in by_label[label][10:15]]
    random.Random(1).shuffle(docs)
    folder = HERE / "data" / "support"
    folder.mkdir(parents=True, exist_ok=True)
    gold = {}
    for i, (text, label) in enumerate(docs[:18]):
        name = f"ticket-{i:03d}.txt"
        (folder / name).write_text(text + "\n", encoding="utf-8")
        gold[name] = label
    for i, (text, label) in enumerate(docs[18:22]):
        message = EmailMessage()
        message["From"] = f"customer{i}@example.com"
        message["To"] = "support@bank.example"
        message["Subject"] = "Help with my account"
        message.set_content(text)
        name = f"mail-{i:03d}.eml"
        (folder / name).write_bytes(bytes(message))
        gold[name] = label
    for i, (text, label) in enumerate(docs[22:25]):
        page = (
            "<html><head><title>Contact form</title><style>p{color:red}</style>"
            "<script>track('contact-form'); var secret = 'do not read me';</script></head>"
            f"<body><nav hidden>Home | Cards | Loans</nav><h1>Message</h1><p>{text}</p></body></html>"
        )
        name = f"form-{i:03d}.html"
        (folder / name).write_text(page, encoding="utf-8")
        gold[name] = label
    with (folder / "chat-export.jsonl").open("w", encoding="utf-8") as handle:
        for i, (text, label) in enumerate(docs[25:30]):
            handle.write(json.dumps({"id": f"chat-{i}", "channel": "app", "message": {"body": text}}) + "\n")
            gold[f"chat-export.jsonl#chat-{i}"] = label
    (folder / "scan-0001.txt").write_bytes(bytes(range(256)) * 8)  # binary junk with a .txt name
    (folder / "empty.txt").write_bytes(b"")
    (HERE / "data" / "support_gold.json").write_text(json.dumps(gold, indent=1, sort_keys=True) + "\n")


INVOICES = [
    ("Northwind Office Supply", "NW-20931", "14/03/2024", "1,284.50", "USD"),
    ("Blue Heron Bakery", "BH-0042", "02/04/2024", "86.40", "EUR"),
    ("Kestrel Logistics Ltd", "KL-7781", "28/02/2024", "3,910.00", "GBP"),
    ("Marigold Florists", "MF-119", "11/01/2024", "245.75", "USD"),
    ("Granite Peak Hardware", "GP-55120", "19/05/2024", "612.99", "USD"),
    ("Café Lumière", "CL-2024-07", "07/06/2024", "58.20", "EUR"),
    ("Ironbridge IT Services", "IB-3307", "30/04/2024", "7,450.00", "GBP"),
    ("Saltmarsh Fisheries", "SF-880", "22/03/2024", "1,032.10", "EUR"),
]
SYMBOL = {"USD": "$", "EUR": "€", "GBP": "£"}
# Scanned invoices: drawn onto a page image, saved as a PNG and as an image-only PDF (no text layer), so the demo
# reads them by OCR (the [ocr] extra).
SCANNED_INVOICES = [
    ("invoice-08.png", ("Harrow Lane Printers", "HL-4410", "09/07/2024", "342.80", "GBP")),
    ("invoice-09.pdf", ("Juniper Street Dental", "JS-2291", "16/08/2024", "1,150.00", "USD")),
]


def _invoice_lines(vendor: str, number: str, date: str, total: str, currency: str, *, seed: int) -> list[str]:
    rng = random.Random(seed)
    items = rng.sample(
        [
            "Paper A4 (box)",
            "Toner cartridge",
            "Delivery",
            "Consulting hour",
            "Pallet hire",
            "Croissants (dozen)",
            "Bouquet",
            "Cable set",
            "Installation",
            "Support plan",
        ],
        3,
    )
    symbol = SYMBOL[currency]
    lines = [
        vendor,
        f"{rng.randint(1, 250)} {rng.choice(['High Street', 'Harbour Road', 'Mill Lane'])}",
        f"Invoice No: {number}",
        f"Date: {date}",
        "",
        "Item                Qty   Amount",
    ]
    lines += [
        f"{item:<20}{rng.randint(1, 9):>3}   {symbol}{rng.randint(5, 300)}.{rng.randint(0, 99):02d}" for item in items
    ]
    lines += [
        "",
        f"Subtotal: {symbol}{total}",
        "VAT included",
        f"TOTAL DUE: {symbol}{total} {currency}",
        "Thank you for your business!",
    ]
    return lines


def build_invoices() -> None:
    from docx import Document
    from fpdf import FPDF

    folder = HERE / "data" / "invoices"
    folder.mkdir(parents=True, exist_ok=True)
    gold = {}
    for i, (vendor, number, date, total, currency) in enumerate(INVOICES):
        lines = _invoice_lines(vendor, number, date, total, currency, seed=i)
        kind = ["txt", "md", "html", "eml", "pdf", "docx", "txt", "md"][i]
        name = f"invoice-{i:02d}.{kind}"
        path = folder / name
        if kind == "txt":
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        elif kind == "md":
            path.write_text(f"# {lines[0]}\n\n" + "\n".join(f"{line}  " for line in lines[1:]) + "\n", encoding="utf-8")
        elif kind == "html":
            body = "".join(f"<p>{line}</p>" for line in lines)
            path.write_text(f"<html><head><script>var x=1;</script></head><body>{body}</body></html>", encoding="utf-8")
        elif kind == "eml":
            message = EmailMessage()
            message["From"] = "billing@example.com"
            message["To"] = "accounts@example.org"
            message["Subject"] = f"Invoice {number}"
            message.set_content("\n".join(lines))
            path.write_bytes(bytes(message))
        elif kind == "pdf":
            pdf = FPDF()
            pdf.add_page()
            pdf.set_font("helvetica", size=11)
            for line in lines:
                pdf.cell(0, 6, line.replace("€", "EUR ").replace("£", "GBP "), new_x="LMARGIN", new_y="NEXT")
            pdf.output(str(path))
        else:
            document = Document()
            for line in lines:
                document.add_paragraph(line)
            document.save(str(path))
        gold[name] = {
            "vendor": vendor,
            "invoice_number": number,
            "invoice_date": date,
            "total": total,
            "currency": currency,
        }
    (HERE / "data" / "invoices_gold.json").write_text(json.dumps(gold, indent=1, sort_keys=True) + "\n")


def build_scanned_invoices() -> None:
    """Draw invoices as a scanner would give them: a grey page image, one as PNG, one as a PDF without text."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    font = ImageFont.load_default(size=30)  # Pillow's bundled FreeType font: the same page on every machine
    gold_path = HERE / "data" / "invoices_gold.json"
    gold = json.loads(gold_path.read_text(encoding="utf-8"))
    for seed, (name, (vendor, number, date, total, currency)) in enumerate(SCANNED_INVOICES, start=len(INVOICES)):
        lines = _invoice_lines(vendor, number, date, total, currency, seed=seed)
        page = Image.new("L", (1240, 120 + 44 * len(lines)), 246)  # off-white paper at 150 dpi
        draw = ImageDraw.Draw(page)
        for row, line in enumerate(lines):
            text = line.replace("€", "EUR ").replace("£", "GBP ")
            # item lines and their header are a table: item, quantity and amount in columns, as printed
            cells = re.split(r"\s{2,}", text.strip()) if re.search(r"\S\s{2,}\S", text) else [text]
            for x, cell in zip((80, 640, 820), cells, strict=False):
                draw.text((x, 60 + 44 * row), cell, font=font, fill=24)
        page = page.filter(ImageFilter.GaussianBlur(0.6))  # the softness of a real scan
        path = HERE / "data" / "invoices" / name
        if name.endswith(".pdf"):
            page.save(path, "PDF", resolution=150)
        else:
            page.save(path, "PNG", optimize=True)
        gold[name] = {
            "vendor": vendor,
            "invoice_number": number,
            "invoice_date": date,
            "total": total,
            "currency": currency,
        }
    gold_path.write_text(json.dumps(gold, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    build_support()
    build_invoices()
    build_scanned_invoices()
