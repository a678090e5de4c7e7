#!/usr/bin/env python3
"""Draw the synthetic document pages in examples/test_images/ and their question set.

Everything is drawn with PIL and Pillow's bundled default font (no other assets); the companies, people and
numbers are invented. Pages are A4 at 127 DPI (1050 x 1485 = 1.56 MP, within MiniCPM-V 2.6's 1.8 MP budget),
saved as 8-bit palette PNGs. Also written: report.pdf (3 pages, A4) and qa.jsonl, whose answers are computed
from the same data the pages are drawn from. The output is deterministic: there is no randomness, and the PDF
carries no dates, so rerunning with the same Pillow version rewrites identical files.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 1050, 1485  # A4 (210 x 297 mm) at 127 DPI
DPI = 127
MARGIN = 80
INK = (25, 25, 30)
GREY = (110, 110, 120)
RULE = (170, 170, 180)
ACCENT = (30, 70, 140)
SHADE = (225, 232, 245)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "examples" / "test_images"


def money(value: Decimal) -> str:
    return f"${value:,.2f}"


def cents(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


class Page:
    """A white page with a few layout helpers; y positions are in pixels from the top."""

    def __init__(self) -> None:
        self.image = Image.new("RGB", (WIDTH, HEIGHT), "white")
        self.draw = ImageDraw.Draw(self.image)
        self._fonts: dict[int, ImageFont.FreeTypeFont] = {}

    def font(self, size: int) -> ImageFont.FreeTypeFont:
        if size not in self._fonts:
            self._fonts[size] = ImageFont.load_default(size=size)
        return self._fonts[size]

    def text(self, x: float, y: float, text: str, size: int = 20, fill=INK, bold: bool = False, anchor="la") -> None:
        # The default font has no bold face; a one-pixel stroke in the text colour stands in for one.
        self.draw.text(
            (x, y),
            text,
            font=self.font(size),
            fill=fill,
            anchor=anchor,
            stroke_width=1 if bold else 0,
            stroke_fill=fill,
        )

    def width_of(self, text: str, size: int) -> float:
        return self.draw.textlength(text, font=self.font(size))

    def paragraph(self, y: float, text: str, size: int = 20, width: float = WIDTH - 2 * MARGIN) -> float:
        """Word-wrap `text` into `width` pixels from the left margin; returns the y below it."""
        line_height = round(size * 1.5)
        line = ""
        for word in text.split():
            candidate = f"{line} {word}".strip()
            if line and self.width_of(candidate, size) > width:
                self.text(MARGIN, y, line, size)
                y += line_height
                line = word
            else:
                line = candidate
        if line:
            self.text(MARGIN, y, line, size)
            y += line_height
        return y + size // 2

    def rule(self, y: float, x0: float = MARGIN, x1: float = WIDTH - MARGIN, fill=RULE, width: int = 1) -> None:
        self.draw.line([(x0, y), (x1, y)], fill=fill, width=width)

    def table(self, y: float, columns: list[tuple[str, int, str]], rows: list[list[str]], size: int = 19) -> float:
        """Draw a ruled table; `columns` are (title, width in pixels, "l" or "r"). Returns the y below it."""
        row_height = round(size * 2.1)
        x_positions = [MARGIN]
        for _, width, _ in columns:
            x_positions.append(x_positions[-1] + width)
        self.draw.rectangle([MARGIN, y, x_positions[-1], y + row_height], fill=SHADE)
        for i, cells in enumerate([[title for title, _, _ in columns], *rows]):
            top = y + i * row_height
            for (_, _, align), x0, x1, cell in zip(columns, x_positions[:-1], x_positions[1:], cells, strict=True):
                x, anchor = (x0 + 10, "lm") if align == "l" else (x1 - 10, "rm")
                self.text(x, top + row_height / 2, cell, size, bold=i == 0, anchor=anchor)
            self.rule(top, x_positions[0], x_positions[-1], fill=RULE if i else INK)
        bottom = y + (len(rows) + 1) * row_height
        self.rule(bottom, x_positions[0], x_positions[-1], fill=INK)
        for x in x_positions:
            self.draw.line([(x, y), (x, bottom)], fill=RULE)
        return bottom + 20

    def checkbox(self, x: float, y: float, label: str, checked: bool, size: int = 20) -> None:
        self.draw.rectangle([x, y, x + size, y + size], outline=INK, width=2)
        if checked:
            self.draw.line(
                [(x + 4, y + size / 2), (x + size / 2 - 1, y + size - 4), (x + size - 3, y + 3)], fill=INK, width=3
            )
        self.text(x + size + 10, y + size / 2, label, size, anchor="lm")

    def field(self, x: float, y: float, width: float, label: str, value: str) -> None:
        self.text(x, y, label, 15, fill=GREY)
        self.text(x + 4, y + 24, value, 22)
        self.rule(y + 56, x, x + width, fill=INK)

    def footer(self, text: str) -> None:
        self.rule(HEIGHT - 70)
        self.text(WIDTH / 2, HEIGHT - 50, text, 15, fill=GREY, anchor="mt")

    def to_palette(self) -> Image.Image:
        # Documents use a handful of colours plus anti-aliasing shades; 32 palette entries keep text crisp and
        # the PNG small. No dithering, so the result is exact and repeatable.
        return self.image.quantize(colors=32, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)


# --------------------------------------------------------------------------------------------- invoices


VENDOR = ["Northwind Paper Supply Co.", "48 Quarry Road, Millbrook, ME 04011", "billing@northwind-paper.example"]


@dataclass(frozen=True)
class Invoice:
    number: str
    date: str
    due: str
    customer: list[str]
    items: list[tuple[str, int, Decimal]]  # description, quantity, unit price
    tax_rate: Decimal = Decimal("0.08")

    @property
    def subtotal(self) -> Decimal:
        return sum((qty * price for _, qty, price in self.items), Decimal(0))

    @property
    def tax(self) -> Decimal:
        return cents(self.subtotal * self.tax_rate)

    @property
    def total(self) -> Decimal:
        return self.subtotal + self.tax


INVOICE_1 = Invoice(
    number="INV-2024-0117",
    date="15 March 2024",
    due="14 April 2024",
    customer=["Harbor Lane Bakery", "Attn: Accounts Payable", "7 Harbor Lane, Millbrook, ME 04011"],
    items=[
        ("A4 copy paper, box of 5 reams", 12, Decimal("38.50")),
        ("Blue ballpoint pens, pack of 50", 4, Decimal("17.25")),
        ("Lever arch files", 30, Decimal("4.80")),
        ("Laser toner cartridge, black", 3, Decimal("89.90")),
        ("Desk organiser, bamboo", 5, Decimal("22.00")),
    ],
)

INVOICE_2 = Invoice(
    number="INV-2024-0142",
    date="2 April 2024",
    due="2 May 2024",
    customer=["Harbor Lane Bakery", "Attn: Accounts Payable", "7 Harbor Lane, Millbrook, ME 04011"],
    items=[
        ("A4 copy paper, box of 5 reams", 6, Decimal("38.50")),
        ("Sticky notes, 12 pads", 10, Decimal("9.95")),
        ("Laser toner cartridge, black", 2, Decimal("89.90")),
        ("Shipping labels, 500 sheets", 1, Decimal("64.00")),
    ],
)


def draw_invoice(invoice: Invoice) -> Page:
    page = Page()
    page.draw.rectangle([0, 0, WIDTH, 14], fill=ACCENT)
    page.text(MARGIN, 70, VENDOR[0], 28, fill=ACCENT, bold=True)
    for i, line in enumerate(VENDOR[1:]):
        page.text(MARGIN, 112 + i * 28, line, 18, fill=GREY)
    page.text(WIDTH - MARGIN, 70, "INVOICE", 44, fill=ACCENT, bold=True, anchor="ra")
    for i, (label, value) in enumerate(
        [("Invoice number", invoice.number), ("Invoice date", invoice.date), ("Due date", invoice.due)]
    ):
        y = 140 + i * 30
        page.text(WIDTH - MARGIN - 230, y, f"{label}:", 18, fill=GREY, anchor="ra")
        page.text(WIDTH - MARGIN, y, value, 18, anchor="ra")
    page.rule(250)
    page.text(MARGIN, 280, "BILL TO", 16, fill=GREY, bold=True)
    for i, line in enumerate(invoice.customer):
        page.text(MARGIN, 310 + i * 30, line, 20, bold=i == 0)
    rows = [[desc, str(qty), money(price), money(qty * price)] for desc, qty, price in invoice.items]
    columns = [("Description", 470, "l"), ("Qty", 90, "r"), ("Unit price", 155, "r"), ("Amount", 175, "r")]
    y = page.table(440, columns, rows)
    label_x, value_x = WIDTH - MARGIN - 200, WIDTH - MARGIN - 10
    tax_label = f"Sales tax ({invoice.tax_rate * 100:.0f}%)"
    for i, (label, value) in enumerate([("Subtotal", invoice.subtotal), (tax_label, invoice.tax)]):
        page.text(label_x, y + 10 + i * 34, label, 19, anchor="ra")
        page.text(value_x, y + 10 + i * 34, money(value), 19, anchor="ra")
    y += 90
    page.draw.rectangle([label_x - 230, y, WIDTH - MARGIN, y + 50], fill=SHADE)
    page.text(label_x, y + 25, "Total amount due", 22, bold=True, anchor="rm")
    page.text(value_x, y + 25, money(invoice.total), 22, bold=True, anchor="rm")
    y += 110
    page.text(MARGIN, y, "Payment terms", 18, fill=GREY, bold=True)
    y = page.paragraph(
        y + 34,
        f"Payment is due within 30 days, by {invoice.due}. Please quote the invoice number {invoice.number} "
        "with your payment. Bank transfer to Millbrook Savings Bank, account 0041-772-905. Late payments may "
        "incur a fee of 1.5% per month.",
        18,
    )
    page.footer("Thank you for your business. Northwind Paper Supply Co. is a fictional company.")
    return page


# --------------------------------------------------------------------------------------------- memo

MEMO = {
    "to": "All staff, Millbrook office",
    "from": "Daniel Okafor, Facilities Manager",
    "date": "20 March 2024",
    "subject": "Office move to 14 Elm Street",
    "move_date": "Friday, 12 April 2024",
    "boxes_by": "Wednesday, 10 April",
    "downtime": "18:00 to 22:00",
    "contact": "extension 2210",
}

MEMO_PARAGRAPHS = [
    "As announced at the last all-hands meeting, our team is moving to the new office at 14 Elm Street. "
    f"The move will take place on {MEMO['move_date']}. The building at 3 Mill Road will close at noon that day, "
    "and the new office opens for everyone on Monday morning.",
    "Each of you will receive four packing boxes and a set of coloured labels next week. Please pack the "
    f"contents of your desk and label every box with your name and new desk number by {MEMO['boxes_by']}. "
    "The movers will not take unlabelled boxes. Personal items of value should be taken home.",
    f"The server room will be shut down on the evening of the move, from {MEMO['downtime']}. Email, the "
    "shared drives and the booking system will be unavailable during that window. Please save your work and "
    "log off before you leave.",
    "Parking at Elm Street is limited to twenty spaces. Permits will be allocated by the facilities team; "
    "the bus stop on Elm Street is served by lines 4 and 11 every fifteen minutes.",
    f"If you have questions about the move, please contact the facilities team on {MEMO['contact']}. Thank "
    "you for your help in making the move a smooth one.",
]


def draw_memo() -> Page:
    page = Page()
    page.text(MARGIN, 90, "MEMORANDUM", 40, fill=ACCENT, bold=True)
    page.rule(150, fill=ACCENT, width=3)
    for i, (label, key) in enumerate([("To:", "to"), ("From:", "from"), ("Date:", "date"), ("Subject:", "subject")]):
        y = 180 + i * 40
        page.text(MARGIN, y, label, 21, bold=True)
        page.text(MARGIN + 130, y, MEMO[key], 21)
    page.rule(350)
    y = 390.0
    for paragraph in MEMO_PARAGRAPHS:
        y = page.paragraph(y, paragraph, 21)
    page.text(MARGIN, y + 20, "Daniel Okafor", 21)
    page.text(MARGIN, y + 52, "Facilities Manager", 19, fill=GREY)
    page.footer("Internal use only")
    return page


# --------------------------------------------------------------------------------------------- form

FORM = {
    "name": "Maria Jensen",
    "employee_id": "E-40721",
    "department": "Finance",
    "email": "m.jensen@harborlane.example",
    "phone": "(207) 555-0148",
    "manager": "Thomas Reed",
    "start": "8 April 2024",
    "return": "31 May 2024",
    "items": {"Laptop": True, "Monitor": False, "Docking station": True, "Headset": False, "Keyboard": True},
    "reason": "Working from the new office and from home during the move.",
}


def draw_form() -> Page:
    page = Page()
    page.text(MARGIN, 80, "Equipment Loan Request", 36, fill=ACCENT, bold=True)
    page.text(MARGIN, 134, "Form IT-7  ·  Please complete all fields in block capitals or type.", 17, fill=GREY)
    page.rule(170, fill=ACCENT, width=3)
    half = (WIDTH - 2 * MARGIN - 40) / 2
    right = MARGIN + half + 40
    page.text(MARGIN, 200, "1. Employee details", 22, bold=True)
    page.field(MARGIN, 245, half, "Full name", FORM["name"])
    page.field(right, 245, half, "Employee ID", FORM["employee_id"])
    page.field(MARGIN, 325, half, "Department", FORM["department"])
    page.field(right, 325, half, "Line manager", FORM["manager"])
    page.field(MARGIN, 405, half, "Email", FORM["email"])
    page.field(right, 405, half, "Phone", FORM["phone"])
    page.text(MARGIN, 515, "2. Equipment requested (tick all that apply)", 22, bold=True)
    for i, (label, checked) in enumerate(FORM["items"].items()):
        page.checkbox(MARGIN + (i % 3) * 300, 565 + (i // 3) * 45, label, checked)
    page.text(MARGIN, 700, "3. Loan period", 22, bold=True)
    page.field(MARGIN, 745, half, "Start date", FORM["start"])
    page.field(right, 745, half, "Return date", FORM["return"])
    page.text(MARGIN, 855, "4. Reason for the loan", 22, bold=True)
    page.draw.rectangle([MARGIN, 895, WIDTH - MARGIN, 985], outline=INK, width=1)
    page.text(MARGIN + 14, 915, FORM["reason"], 20)
    page.text(MARGIN, 1025, "5. Declaration", 22, bold=True)
    page.paragraph(
        1065,
        "I will take reasonable care of the equipment, will not lend it to others, and will return it by the "
        "return date above. I understand that loss or damage must be reported to the IT service desk at once.",
        18,
    )
    page.field(MARGIN, 1190, half, "Signature", "M. Jensen")
    page.field(right, 1190, half, "Date", "25 March 2024")
    page.draw.rectangle([MARGIN, 1290, WIDTH - MARGIN, 1390], fill=(242, 242, 242), outline=RULE)
    page.text(MARGIN + 14, 1304, "For IT use only", 16, fill=GREY, bold=True)
    page.checkbox(MARGIN + 14, 1340, "Approved", True, 18)
    page.checkbox(MARGIN + 200, 1340, "Rejected", False, 18)
    page.text(MARGIN + 400, 1349, "Asset tags: LT-2291, DS-0834, KB-1170", 17, anchor="lm")
    page.footer("Harbor Lane Bakery  ·  IT service desk")
    return page


# --------------------------------------------------------------------------------------------- report

REPORT_TITLE = "Quarterly Sales Report, Q1 2024"
REGIONS = {  # region -> units sold in January, February, March
    "North": (1240, 1315, 1408),
    "South": (980, 1102, 1250),
    "East": (1530, 1497, 1362),
    "West": (860, 905, 1611),
    "Central": (1105, 1088, 1143),
}
PRODUCTS = {  # product -> (units sold in Q1, unit price)
    "Sourdough loaf": (6120, Decimal("5.50")),
    "Rye bread": (2980, Decimal("4.75")),
    "Croissant, 4-pack": (4410, Decimal("7.20")),
    "Cinnamon roll": (3205, Decimal("3.10")),
    "Seeded baguette": (2705, Decimal("3.95")),
}


def region_totals() -> dict[str, int]:
    return {region: sum(months) for region, months in REGIONS.items()}


def draw_report_summary() -> Page:
    totals = region_totals()
    best = max(totals, key=totals.get)
    page = Page()
    page.text(MARGIN, 90, REPORT_TITLE, 36, fill=ACCENT, bold=True)
    page.text(MARGIN, 145, "Harbor Lane Bakery  ·  prepared by the finance team  ·  5 April 2024", 18, fill=GREY)
    page.rule(185, fill=ACCENT, width=3)
    page.text(MARGIN, 220, "Summary", 26, bold=True)
    y = page.paragraph(
        270,
        f"In the first quarter of 2024 we sold {sum(totals.values()):,} units across our five regions, "
        f"{sum(REGIONS[r][2] for r in REGIONS) - sum(REGIONS[r][0] for r in REGIONS):,} more in March than in "
        f"January. The {best} region sold the most units over the quarter ({totals[best]:,}). The West region "
        "grew fastest after the new store on Bay Street opened in March.",
        21,
    )
    page.text(MARGIN, y + 10, "Contents", 26, bold=True)
    for i, line in enumerate(["1. Summary", "2. Units sold by region", "3. Units and revenue by product"]):
        page.text(MARGIN + 20, y + 60 + i * 36, line, 21)
    y += 200
    page.text(MARGIN, y, "Notes", 26, bold=True)
    page.paragraph(
        y + 50,
        "Figures are units sold to customers, net of returns. Revenue is shown before tax. The Central region "
        "includes the market stall, which was closed for two weeks in February for repairs.",
        21,
    )
    page.footer("Quarterly Sales Report, Q1 2024  ·  page 1 of 3")
    return page


def draw_report_regions() -> Page:
    totals = region_totals()
    page = Page()
    page.text(MARGIN, 90, "2. Units sold by region", 32, fill=ACCENT, bold=True)
    page.rule(145, fill=ACCENT, width=3)
    page.paragraph(175, "Units sold per month in each region during the first quarter of 2024.", 21)
    columns = [
        ("Region", 290, "l"),
        ("January", 150, "r"),
        ("February", 150, "r"),
        ("March", 150, "r"),
        ("Q1 total", 150, "r"),
    ]
    rows = [[region, *(f"{m:,}" for m in months), f"{totals[region]:,}"] for region, months in REGIONS.items()]
    month_sums = [sum(months[i] for months in REGIONS.values()) for i in range(3)]
    rows.append(["All regions", *(f"{m:,}" for m in month_sums), f"{sum(month_sums):,}"])
    y = page.table(260, columns, rows, size=20)
    page.paragraph(
        y + 20,
        "March figures for the West region include the first three weeks of the Bay Street store. "
        "East was the only region whose sales fell in every month of the quarter.",
        21,
    )
    page.footer("Quarterly Sales Report, Q1 2024  ·  page 2 of 3")
    return page


def draw_report_products() -> Page:
    page = Page()
    page.text(MARGIN, 90, "3. Units and revenue by product", 32, fill=ACCENT, bold=True)
    page.rule(145, fill=ACCENT, width=3)
    page.paragraph(175, "Units sold and revenue before tax for our five best-selling products in Q1 2024.", 21)
    columns = [("Product", 350, "l"), ("Units", 160, "r"), ("Unit price", 170, "r"), ("Revenue", 210, "r")]
    rows = [[name, f"{units:,}", money(price), money(units * price)] for name, (units, price) in PRODUCTS.items()]
    revenue = sum((units * price for units, price in PRODUCTS.values()), Decimal(0))
    rows.append(["Total", f"{sum(u for u, _ in PRODUCTS.values()):,}", "", money(revenue)])
    y = page.table(260, columns, rows, size=20)
    page.paragraph(
        y + 20,
        "Sourdough remains our best seller by units and by revenue. The cinnamon roll, launched in January, "
        "passed 3,000 units in its first quarter.",
        21,
    )
    page.footer("Quarterly Sales Report, Q1 2024  ·  page 3 of 3")
    return page


# --------------------------------------------------------------------------------------------- questions


def questions() -> list[dict]:
    totals = region_totals()
    march_best = max(REGIONS, key=lambda r: REGIONS[r][2])
    higher = max((INVOICE_1, INVOICE_2), key=lambda inv: inv.total)
    top_revenue = max(PRODUCTS, key=lambda p: PRODUCTS[p][0] * PRODUCTS[p][1])

    def amounts(value: Decimal) -> list[str]:
        return list(dict.fromkeys([money(value), f"{value:,.2f}", f"{value:.2f}"]))

    return [
        {"image": "invoice_1.png", "question": "What is the total amount due?", "answers": amounts(INVOICE_1.total)},
        {"image": "invoice_1.png", "question": "What is the invoice number?", "answers": [INVOICE_1.number]},
        {
            "image": "invoice_1.png",
            "question": "How many boxes of A4 copy paper were ordered?",
            "answers": [str(INVOICE_1.items[0][1])],
        },
        {"image": "invoice_2.png", "question": "What is the total amount due?", "answers": amounts(INVOICE_2.total)},
        {"image": "invoice_2.png", "question": "What is the due date of this invoice?", "answers": [INVOICE_2.due]},
        {
            "images": ["invoice_1.png", "invoice_2.png"],
            "question": "What is the invoice number of the invoice with the higher total amount due?",
            "answers": [higher.number],
        },
        {"image": "memo.png", "question": "Who is the memo from?", "answers": [MEMO["from"], "Daniel Okafor"]},
        {
            "image": "memo.png",
            "question": "On what date will the office move take place?",
            "answers": [MEMO["move_date"], "12 April 2024", "April 12, 2024"],
        },
        {"image": "form.png", "question": "What is the employee ID?", "answers": [FORM["employee_id"]]},
        {
            "image": "form.png",
            "question": "Which department does the employee work in?",
            "answers": [FORM["department"]],
        },
        {
            "image": "form.png",
            "question": "Is the monitor box ticked? Answer yes or no.",
            "answers": ["yes" if FORM["items"]["Monitor"] else "no"],
        },
        {
            "image": "report.png",
            "question": "How many units did the North region sell in Q1 in total?",
            "answers": [f"{totals['North']:,}", str(totals["North"])],
        },
        {"pdf": "report.pdf", "page": 1, "question": "What is the title of the report?", "answers": [REPORT_TITLE]},
        {
            "pdf": "report.pdf",
            "page": 2,
            "question": "Which region sold the most units in March?",
            "answers": [march_best],
        },
        {
            "pdf": "report.pdf",
            "page": 3,
            "question": "Which product brought in the most revenue?",
            "answers": [top_revenue],
        },
    ]


# --------------------------------------------------------------------------------------------- main


def write_all(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    report = [draw_report_summary(), draw_report_regions(), draw_report_products()]
    pages = {
        "invoice_1.png": draw_invoice(INVOICE_1),
        "invoice_2.png": draw_invoice(INVOICE_2),
        "memo.png": draw_memo(),
        "form.png": draw_form(),
        "report.png": report[1],
    }
    written = []
    for name, page in pages.items():
        path = out / name
        page.to_palette().save(path, optimize=True)
        written.append(path)
    # PIL stores PDF pages as JPEG; grayscale keeps the file small and the text legible. No title or dates,
    # so the bytes do not depend on the file name or the clock.
    gray = [page.image.convert("L") for page in report]
    path = out / "report.pdf"
    gray[0].save(
        path,
        "PDF",
        save_all=True,
        append_images=gray[1:],
        resolution=DPI,
        quality=75,
        title=None,
        creationDate=None,
        modDate=None,
    )
    written.append(path)
    path = out / "qa.jsonl"
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in questions()), encoding="utf-8")
    written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=textwrap.dedent(__doc__ or ""), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    args = parser.parse_args()
    for path in write_all(args.out):
        print(f"{path}  {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
