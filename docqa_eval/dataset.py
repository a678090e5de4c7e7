"""The question set: one JSON object per line, each naming its page(s), a question and the accepted answers.

    {"image": "invoice_1.png", "question": "What is the total amount due?", "answers": ["$1,139.08"]}
    {"images": ["invoice_1.png", "invoice_2.png"], "question": "...", "answers": ["..."]}
    {"pdf": "report.pdf", "page": 2, "question": "...", "answers": ["..."]}

Paths are relative to the JSONL file's folder. "page" is 1-based (default 1). An optional "id" names the item
in reports (default: "<file stem>:<line number>"). Blank lines are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class DatasetError(ValueError):
    """A question set that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class QAItem:
    id: str
    question: str
    answers: tuple[str, ...]
    images: tuple[Path, ...] = ()
    pdf: Path | None = None
    page: int = 1

    @property
    def source(self) -> str:
        """What the question is asked about, for reports: "invoice_1.png" or "report.pdf#page=2"."""
        if self.pdf is not None:
            return f"{self.pdf.name}#page={self.page}"
        return ", ".join(path.name for path in self.images)


def load_jsonl(path: str | Path) -> list[QAItem]:
    """Read and validate a question set. Raises `DatasetError` ("<path>:<line>: what is wrong") on any problem."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DatasetError(f"cannot read the question set {path}: {exc.strerror or exc}") from None
    items = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            items.append(_parse_line(line, path, number))
    if not items:
        raise DatasetError(f"{path}: the question set is empty")
    return items


def _parse_line(line: str, path: Path, number: int) -> QAItem:
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{where}: 'question' is missing or not a non-empty string")
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise DatasetError(f"{where}: 'answers' is missing or not a non-empty list of strings")
    sources = [key for key in ("image", "images", "pdf") if key in record]
    if len(sources) != 1:
        raise DatasetError(f"{where}: give exactly one of 'image', 'images' or 'pdf' (found {sources or 'none'})")
    images: tuple[Path, ...] = ()
    pdf = None
    page = 1
    if "pdf" in record:
        pdf = _file(record["pdf"], "pdf", path, where)
        page = record.get("page", 1)
        if not isinstance(page, int) or isinstance(page, bool) or page < 1:
            raise DatasetError(f"{where}: 'page' must be a page number from 1, got {page!r}")
    else:
        names = [record["image"]] if "image" in record else record["images"]
        if not isinstance(names, list) or not names:
            raise DatasetError(f"{where}: 'images' must be a non-empty list of file names")
        images = tuple(_file(name, "image", path, where) for name in names)
    item_id = record.get("id", f"{path.stem}:{number}")
    return QAItem(id=str(item_id), question=question, answers=tuple(answers), images=images, pdf=pdf, page=page)


def _file(name: object, key: str, dataset: Path, where: str) -> Path:
    if not isinstance(name, str) or not name:
        raise DatasetError(f"{where}: '{key}' must be a file name, got {name!r}")
    file = dataset.parent / name
    if not file.is_file():
        raise DatasetError(f"{where}: {key} file {name!r} not found next to the question set ({file})")
    return file
