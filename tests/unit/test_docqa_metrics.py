"""docqa_eval: ANLS and exact match, question-set loading, request building and reports (no server)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from docqa_eval.dataset import DatasetError, QAItem, load_jsonl
from docqa_eval.metrics import anls, exact_match, levenshtein, normalize
from docqa_eval.report import build_report, render_markdown, write_report
from docqa_eval.runner import Prediction, build_messages, run

# ----------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("a", "b", "distance"), [("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3), ("abc", "abc", 0)]
)
def test_levenshtein(a, b, distance):
    assert levenshtein(a, b) == distance == levenshtein(b, a)


def test_identical_answer_scores_one():
    assert anls("INV-2024-0117", ["INV-2024-0117"]) == 1.0
    assert exact_match("INV-2024-0117", ["INV-2024-0117"])


def test_one_edit_in_ten_characters_scores_point_nine():
    assert anls("1234567890", ["1234567899"]) == pytest.approx(0.9)
    assert not exact_match("1234567890", ["1234567899"])


def test_below_threshold_scores_zero():
    assert anls("abcdef", ["abcxyz"]) == 0.0  # NL = 0.5 is not below the threshold
    assert anls("abcdefg", ["abcdxyz"]) == pytest.approx(1 - 3 / 7)  # NL = 3/7 < 0.5
    assert anls("completely different", ["Finance"]) == 0.0


def test_best_answer_counts():
    assert anls("12 April 2024", ["Friday, 12 April 2024", "12 April 2024"]) == 1.0
    assert anls("Daniel Okafor", ["Facilities", "Daniel Okafr"]) == pytest.approx(1 - 1 / 13)
    assert exact_match("12 april 2024", ["Friday", "12 April 2024"])


def test_case_and_whitespace_are_normalised():
    assert normalize("  Total \t Amount\nDue ") == "total amount due"
    assert anls("  finance ", ["FINANCE"]) == 1.0
    assert exact_match("West\n", ["west"])
    assert anls("$1,139.08", ["$1,139.08 "]) == 1.0


def test_empty_prediction_and_no_answers():
    assert anls("", ["Finance"]) == 0.0
    assert not exact_match("", ["Finance"])
    assert anls("", [""]) == 1.0
    assert anls("Finance", []) == 0.0


# ----------------------------------------------------------------------------------------------- dataset


def _write(tmp_path, lines: list[str]):
    (tmp_path / "page.png").write_bytes(_png((40, 30), "white"))
    (tmp_path / "doc.pdf").write_bytes(_pdf(3))
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _png(size, colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def _pdf(num_pages: int) -> bytes:
    colours = ["red", "lime", "blue", "yellow"][:num_pages]
    pages = [Image.new("RGB", (72, 72), colour) for colour in colours]
    buffer = io.BytesIO()
    pages[0].save(buffer, "PDF", save_all=True, append_images=pages[1:], resolution=72)
    return buffer.getvalue()


def test_load_jsonl(tmp_path):
    path = _write(
        tmp_path,
        [
            '{"image": "page.png", "question": "Q1?", "answers": ["a"]}',
            "",
            '{"images": ["page.png", "page.png"], "question": "Q2?", "answers": ["b", "c"], "id": "two"}',
            '{"pdf": "doc.pdf", "page": 2, "question": "Q3?", "answers": ["d"]}',
        ],
    )
    first, second, third = load_jsonl(path)
    assert first == QAItem(id="qa:1", question="Q1?", answers=("a",), images=(tmp_path / "page.png",))
    assert second.id == "two" and len(second.images) == 2 and second.source == "page.png, page.png"
    assert third.pdf == tmp_path / "doc.pdf" and third.page == 2 and third.source == "doc.pdf#page=2"
    assert third.id == "qa:4"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"image": "page.png", "answers": ["a"]}', r"qa.jsonl:2: 'question' is missing"),
        ('{"image": "page.png", "question": "", "answers": ["a"]}', r"qa.jsonl:2: 'question' is missing"),
        ('{"image": "page.png", "question": "Q?"}', r"qa.jsonl:2: 'answers' is missing"),
        ('{"image": "page.png", "question": "Q?", "answers": "a"}', r"qa.jsonl:2: 'answers' is missing"),
        ('{"question": "Q?", "answers": ["a"]}', r"qa.jsonl:2: give exactly one of"),
        (
            '{"image": "page.png", "pdf": "doc.pdf", "question": "Q?", "answers": ["a"]}',
            r"qa.jsonl:2: give exactly one",
        ),
        (
            '{"image": "missing.png", "question": "Q?", "answers": ["a"]}',
            r"qa.jsonl:2: image file 'missing.png' not found",
        ),
        ('{"pdf": "doc.pdf", "page": 0, "question": "Q?", "answers": ["a"]}', r"qa.jsonl:2: 'page' must be"),
        ('{"images": [], "question": "Q?", "answers": ["a"]}', r"qa.jsonl:2: 'images' must be a non-empty list"),
        ("{not json", r"qa.jsonl:2: not valid JSON"),
        ('["a list"]', r"qa.jsonl:2: expected a JSON object"),
    ],
)
def test_load_jsonl_errors_name_the_line(tmp_path, line, message):
    path = _write(tmp_path, ['{"image": "page.png", "question": "Q1?", "answers": ["a"]}', line])
    with pytest.raises(DatasetError, match=message):
        load_jsonl(path)


def test_load_jsonl_missing_or_empty_file(tmp_path):
    with pytest.raises(DatasetError, match="cannot read the question set"):
        load_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="empty"):
        load_jsonl(tmp_path / "empty.jsonl")


def test_example_question_set_loads():
    items = load_jsonl(Path(__file__).parents[2] / "examples" / "test_images" / "qa.jsonl")
    assert 10 <= len(items) <= 20
    assert any(item.pdf is not None for item in items)


# ----------------------------------------------------------------------------------------------- requests


def _decode(url: str) -> Image.Image:
    header, data = url.split(",", 1)
    assert header == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_messages_for_images_and_pdf_pages(tmp_path):
    path = _write(
        tmp_path,
        [
            '{"images": ["page.png", "page.png"], "question": "Q1?", "answers": ["a"]}',
            '{"pdf": "doc.pdf", "page": 3, "question": "Q2?", "answers": ["b"]}',
        ],
    )
    images_item, pdf_item = load_jsonl(path)
    (message,) = build_messages(images_item, instruction="Be brief.")
    assert message["role"] == "user"
    assert [part["type"] for part in message["content"]] == ["image_url", "image_url", "text"]
    assert message["content"][-1]["text"] == "Q1? Be brief."
    assert _decode(message["content"][0]["image_url"]["url"]).size == (40, 30)

    (message,) = build_messages(pdf_item, instruction="", dpi=144)
    assert message["content"][-1] == {"type": "text", "text": "Q2?"}
    page = _decode(message["content"][0]["image_url"]["url"]).convert("RGB")
    assert page.size == (144, 144)
    red, green, blue = page.getpixel((72, 72))
    assert blue > 200 and red < 50 and green < 50  # page 3 is the blue one


def test_run_keeps_item_order_and_records_failures():
    items = [QAItem(id=str(i), question=f"Q{i}", answers=("a",)) for i in range(6)]

    def ask_one(item: QAItem) -> Prediction:
        if item.id == "3":
            raise RuntimeError("boom")
        return Prediction(f"answer {item.id}", 0.1)

    predictions = run(items, ask_one, concurrency=3, progress=False)
    assert [p.text for p in predictions] == ["answer 0", "answer 1", "answer 2", None, "answer 4", "answer 5"]
    assert predictions[3].error == "RuntimeError: boom"


# ----------------------------------------------------------------------------------------------- reports


def _report():
    items = [
        QAItem(id="total", question="What is the total?", answers=("$1,139.08", "1139.08")),
        QAItem(id="dept", question="Which department?", answers=("Finance",)),
        QAItem(id="id", question="Employee ID?", answers=("E-40721",)),
        QAItem(id="down", question="Title | subtitle?", answers=("Report",)),
    ]
    predictions = [
        Prediction("$1,139.08", 0.5),
        Prediction("finance", 1.5),
        Prediction("E-40727", 1.0),
        Prediction(None, 2.0, "APIConnectionError: Connection error."),
    ]
    return build_report(items, predictions, model="tiny", base_url="http://x/v1", data="qa.jsonl", date="2024-01-01")


def test_report_scores_and_summary():
    report = _report()
    rows = {row["id"]: row for row in report["items"]}
    assert rows["total"]["anls"] == 1.0 and rows["total"]["exact"] is True
    assert rows["dept"]["exact"] is True
    assert rows["id"]["anls"] == pytest.approx(6 / 7, abs=1e-4) and rows["id"]["exact"] is False
    assert rows["down"] == {
        "id": "down",
        "source": "",
        "question": "Title | subtitle?",
        "prediction": None,
        "answers": ["Report"],
        "anls": 0.0,
        "exact": False,
        "latency_s": 2.0,
        "error": "APIConnectionError: Connection error.",
    }
    summary = report["summary"]
    assert summary["count"] == 4 and summary["errors"] == 1
    assert summary["mean_anls"] == pytest.approx((1 + 1 + 6 / 7 + 0) / 4, abs=1e-4)
    assert summary["exact_match"] == 0.5
    assert summary["latency_s"] == {"mean": 1.0, "median": 1.0, "max": 1.5}  # the failed item is left out
    assert summary["model"] == "tiny" and summary["date"] == "2024-01-01"
    json.dumps(report)  # JSON-ready


def test_report_needs_one_prediction_per_item():
    with pytest.raises(ValueError, match="2 items but 1 predictions"):
        build_report([QAItem("a", "q", ("x",))] * 2, [Prediction("x")], model="m")


def test_markdown_lists_errors_then_worst_answers(tmp_path):
    markdown = render_markdown(_report())
    assert "| Mean ANLS (threshold 0.5) | 0.714 |" in markdown
    assert "| Exact match | 50.0% (2/4) |" in markdown
    assert "| Errors | 1 |" in markdown
    worst = markdown.split("## Worst items (2 shown)")[1]
    assert worst.index("**error:** APIConnectionError") < worst.index("E-40727")
    assert "Title \\| subtitle?" in worst  # pipes escaped inside table cells
    assert "finance" not in worst  # perfect answers are not listed

    json_path, markdown_path = write_report(_report(), tmp_path / "out")
    assert json.loads(json_path.read_text())["summary"]["count"] == 4
    assert markdown_path.read_text() == markdown


def test_markdown_when_everything_matches():
    report = build_report([QAItem("a", "q", ("x",))], [Prediction("X", 0.2)], model="m", date="d")
    assert "Every answer matched" in render_markdown(report)
