"""Final answers of reasoning replies: where to find them and when two of them are the same value.

Equivalence is math-verify's (the checker the open R1-style recipes use): numbers, fractions,
roots, powers, percents, tuples, intervals and equations are compared as values, so `-\\frac{1}{2}`
equals `-0.5` and `2^{10}` does not equal `2`. Extraction is ours and deliberately narrow: a reply
whose thinking block never closed has no answer at all, rather than whatever number it stopped on.
"""

from __future__ import annotations

import logging
import re

_ANSWER_LINE = re.compile(r"(?:\bfinal answer\b|\banswer\b)\s*(?:is)?\s*[:=]?\s*(.+)|^#{4}\s*(.+)", re.I | re.M)
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_E_NOTATION = re.compile(r"(\d)[eE]([-+]?\d+)\b")
# Single letters are variables ("2x", "2 x"); these few are read as units when they follow a number.
_SI_LETTERS = {"m", "s", "g", "K", "A", "N", "J", "W", "V", "L", "C", "T", "h"}
_NUMBER_THEN_UNIT = re.compile(r"^([-+]?\d[\d,]*(?:\.\d+)?(?:\s*\\times\s*10\^\{?[-+]?\d+\}?)?)\s+([A-Za-z][A-Za-z/^\d.\s-]*)$")


def _last_boxed(text: str) -> str | None:
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _strip_wrappers(s: str) -> str:
    s = s.strip().strip("*").strip().rstrip(".").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) > len(left) + len(right):
            s = s[len(left):-len(right)].strip()
    return s.rstrip(".").strip()


def final_answer(response: str) -> str | None:
    """The answer a reply commits to: the last \\boxed{}, else the last 'answer: ...' line, else
    the last number; None where there is none, or where a <think> block was never closed."""
    head, sep, tail = response.rpartition("</think>")
    if sep:
        response = tail
    elif "<think>" in response:
        return None
    boxed = _last_boxed(response)
    if boxed is not None:
        return boxed.strip() or None
    lines = [a or b for a, b in _ANSWER_LINE.findall(response)]
    if lines:
        return _strip_wrappers(lines[-1]) or None
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def _as_latex(answer: str) -> str:
    """Spell an answer the way math-verify's LaTeX parser reads it: units that are words dropped,
    1e-3 written as a power of ten."""
    s = _strip_wrappers(answer)
    s = _E_NOTATION.sub(r"\1\\times 10^{\2}", s)
    m = _NUMBER_THEN_UNIT.match(s)
    if m:
        words = re.findall(r"[A-Za-z]+", m.group(2))
        if all(len(w) > 1 or w in _SI_LETTERS for w in words):
            s = m.group(1)
    return s


def _parse(answer: str):
    from math_verify import LatexExtractionConfig, parse

    try:
        return parse(f"${_as_latex(answer)}$", extraction_config=[LatexExtractionConfig()])
    except Exception:  # math-verify raises from deep inside sympy on odd input; unparseable is the answer
        return []


def _text(answer: str) -> str:
    return " ".join(_strip_wrappers(answer).casefold().split())


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """Whether an extracted answer equals the reference: as values where the reference is math,
    as case- and space-insensitive text where it is not (e.g. 'mitochondria')."""
    if not predicted or not reference or not str(reference).strip():
        return False
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold = _parse(str(reference))
    if not gold:
        return _text(predicted) == _text(str(reference))
    pred = _parse(predicted)
    if not pred:
        return False
    from math_verify import verify

    try:
        return bool(verify(gold, pred))
    except Exception:
        return False
