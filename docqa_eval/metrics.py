"""DocVQA metrics: ANLS (Average Normalized Levenshtein Similarity) and exact match.

Both compare a prediction with every accepted answer after the same normalisation as the DocVQA evaluation
(lower case, surrounding whitespace stripped, inner whitespace runs collapsed to one space) and keep the
best score. ANLS for one question is max over answers of 1 - NL(answer, prediction) when NL < `threshold`,
else 0, with NL the Levenshtein distance divided by the longer string's length (Biten et al., "Scene Text
Visual Question Answering", ICCV 2019). The dataset score is the mean over questions.
"""

from __future__ import annotations

from collections.abc import Sequence

ANLS_THRESHOLD = 0.5


def normalize(text: str) -> str:
    """Lower-case and collapse whitespace: "  Total\tDue " -> "total due"."""
    return " ".join(text.lower().split())


def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit-cost insertions, deletions and substitutions."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def normalized_levenshtein_similarity(prediction: str, answer: str, threshold: float = ANLS_THRESHOLD) -> float:
    """1 - NL for one answer (both normalised), or 0 when NL >= `threshold`. Two empty strings score 1."""
    prediction, answer = normalize(prediction), normalize(answer)
    longest = max(len(prediction), len(answer))
    if longest == 0:
        return 1.0
    distance = levenshtein(prediction, answer) / longest
    return 1.0 - distance if distance < threshold else 0.0


def anls(prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """The ANLS of one prediction: the best similarity over the accepted `answers` (0 when there are none)."""
    return max((normalized_levenshtein_similarity(prediction, answer, threshold) for answer in answers), default=0.0)


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """Whether the normalised prediction equals one of the normalised answers."""
    normalized = normalize(prediction)
    return any(normalized == normalize(answer) for answer in answers)
