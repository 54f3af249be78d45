"""Final answers of reasoning replies: where to find them and when two of them are the same value.

Equivalence is math-verify's (the checker the open R1-style recipes use): numbers, fractions,
roots, powers, percents, tuples, intervals and equations are compared as values, so `-\\frac{1}{2}`
equals `-0.5` and `2^{10}` does not equal `2`. Extraction is ours and deliberately narrow: a reply
whose thinking block never closed, or that was cut off at the token limit without stating an
answer, has no answer at all, rather than whatever number it stopped on.

Rules on top of math-verify's (TRAINING_GUIDE, "How answers are checked"):
- a hedged or multi-valued answer in prose ("3 or 4", "12 and 13", "10 minus 3") is wrong against a
  reference that is one value; a list written as math ("3, 4") is a set and compared as one;
- a mixed number ("2 1/2", "2\\frac{1}{2}") is its value, 5/2;
- a range ("3-4", "3–4") is no single value either; "3 - 4", spaced, is a subtraction;
- a lettered choice ("(B) 12", "B.", "Option B") is compared by its letter where the reference is one,
  and a hedge or list over letters ("A or B", "(A) or (C)", "A (or maybe B)") is wrong against it;
- "approximately 7" states 7; a currency sign is dropped like a unit ("€5", "5€", "£1,000");
  "√2" is \\sqrt{2}; digits grouped by spaces in threes ("1 234", thin spaces too) are one number;
- units are dropped, except that two different unit symbols ("10 m" against "10 cm") never match.
"""

from __future__ import annotations

import logging
import re
import unicodedata

# "answer" counts only as a marker, followed by ':' or '=' or 'is' (markdown emphasis allowed):
# prose that uses the word ("I hope this answer helps", "to answer the question") states nothing.
_ANSWER_LINE = re.compile(r"\banswer\b[*_ \t]*(?:is\b[ \t]*:?|[:=])[*_ \t]*(.+)|^#{4}\s*(.+)", re.I | re.M)
# a later statement on the same line wins: "The answer is 5. Answer: 6", "Final Answer: The final answer is 42"
_INNER_ANSWER = re.compile(r"\banswer\b[*_ \t]*(?:is\b[ \t]*:?|[:=])[*_ \t]*(.+)", re.I)
# what follows the value on the same line: a new sentence ("42. I hope it is correct") or an aside in
# parentheses after a space ("42 (the sum)"); "f(x)" and "(1, 2)" have no space before the parenthesis
_SENTENCE_AFTER = re.compile(r"\.\s+[A-Z].*$")
_ASIDE_AFTER = re.compile(r"(?<=\S)\s+\([^()]*\)$")
# an aside that offers another value is a hedge ("3 (or 4)"), not a remark to strip
_HEDGE = re.compile(r"\b(?:or|either|maybe|perhaps|possibly)\b", re.I)
# parentheses right after "or", "and" or a comma are the list's next value ("(A) or (C)", "(A), (B)"), not a remark
_LISTED_BEFORE = re.compile(r"(?:\b(?:or|and)|[,/&])\s*$", re.I)
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")  # words of prose; \frac and other LaTeX commands are not
_TRAILING_WORDS = re.compile(r"(?:\s+[A-Za-z]{2,}[.,]?)+\s*$")
_NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_E_NOTATION = re.compile(r"(\d)[eE]([-+]?\d+)\b")
# Single letters are variables ("2x", "2 x"); these few are read as units when they follow a number.
_SI_LETTERS = {"m", "s", "g", "K", "A", "N", "J", "W", "V", "L", "C", "T", "h"}
# a whole number and a proper fraction: 2 1/2, 2\frac{1}{2}
_MIXED = re.compile(r"(?<![\d.,/}])(-?)(\d+)\s*(?:\s(\d+)/(\d+)|\\[dt]?frac\{(\d+)\}\{(\d+)\})(?![\d/])")
# what belongs to one number when counting the values an answer states: a fraction, a power, 10^n
_ONE_VALUE = re.compile(r"\\[dt]?frac\{[^{}]*\}\{[^{}]*\}|\s*\\times\s*10\^\{?[-+]?\d+\}?|\^\{[^{}]*\}|\^-?\d+"
                        r"|(?<=\d)[eE][-+]?\d+\b")
# a lettered choice: "B", "(B)", "B)", "B.", "B: 12", "Option B" (a lone capital, so the article "a" is not one)
_CHOICE = re.compile(r"^(?:(?:[Oo]ption|[Cc]hoice)\s+)?(?:\(([A-Ja-j])\)|([A-J])(?=$|[.):]|\s))")
# a second letter joined to the first choice by a hedge or a list: "A or B", "(A) or (C)", "A (or maybe B)";
# a choice whose own text holds words or letters ("(C) A and B", "(B) red or blue") is not one
_MORE_CHOICES = re.compile(r"\s*\(?\s*(?:(?:or|and|maybe|perhaps|possibly)\b\s*|[,/&]\s*)+"
                           r"(?:\([A-Ja-j]\)|[A-J](?![A-Za-z]))")
# two numbers joined by a hyphen (unspaced) or a dash: a range, which is no single value
_RANGE = re.compile(r"^[-+]?\d[\d,.]*(?:-|\s*[–—]\s*)\d[\d,.]*$")
# "approximately 7" states 7; a bound ("at least 7", "nearly 7") states no value and is left alone
_APPROX = re.compile(r"^(?:approximately|approx\.?|about|around|roughly|\\approx|≈|~)\s*", re.I)
# a currency sign beside a number is its unit, dropped as "$" and "dollars" are: "€5", "5€", "£1,000"
_CURRENCY = re.compile(r"[€£¥₹¢](?=\s*[-+]?\d)|(?<=\d)\s*[€£¥₹¢]")
# the root sign: "√2", "√(2)", "√x", written as the LaTeX math-verify reads
_ROOT_SIGN = re.compile(r"√\s*(?:\(([^()]*)\)|\{([^{}]*)\}|(\d+(?:\.\d+)?|[A-Za-z]))")
# digits grouped by single spaces (thin and narrow no-break spaces are spaces after NFKC): "1 234 567".
# Only a first group of one to three digits and then groups of exactly three, so "1 2", "12 34" and the
# mixed number "2 100/300" stay as they are
_SPACED_GROUPS = re.compile(r"(?<![\d.,])(?<!\d )\d{1,3}(?: \d{3})+(?![\d/]| \d)")
# a unit symbol, with an SI prefix where it takes one ("m", "cm", "km", "kg", "ms", "mL")
_UNIT_SYMBOL = re.compile(r"(?:[kcmunMG]|da)?(?:m|g|s|L|l|A|K|N|J|W|V|Pa|Hz|B)|h|min")
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


def _without_aside(value: str) -> str:
    """`value` without a closing remark in parentheses, unless the remark is a hedge ("3 (or 4)")."""
    aside = _ASIDE_AFTER.search(value)
    if not aside or _HEDGE.search(aside.group(0)) or _LISTED_BEFORE.search(value[:aside.start()]):
        return value
    return value[:aside.start()]


def answer_lines(text: str) -> list[str]:
    """The values of the reply's explicit answer statements ('Answer: 42', 'the answer is 42',
    '#### 42'), in order, each cut to the value itself."""
    out = []
    for a, b in _ANSWER_LINE.findall(text):
        value = _without_aside((a or b).strip())  # first: "6 (the answer is not 5)" states 6
        inner = _INNER_ANSWER.search(value)
        while inner:
            value = inner.group(1)
            inner = _INNER_ANSWER.search(value)
        value = _without_aside(_SENTENCE_AFTER.sub("", value.strip()))
        value = _strip_wrappers(value)
        if value:
            out.append(value)
    return out


def final_answer(response: str, truncated: bool = False) -> str | None:
    """The answer a reply commits to: the last \\boxed{}, else the last 'answer: ...' line, else
    the last number; None where there is none, where a <think> block was never closed, or where
    the reply was `truncated` (stopped by the token limit) before it boxed or stated an answer:
    the last number of a sentence cut in half is no answer, even where it happens to be right."""
    head, sep, tail = response.rpartition("</think>")
    if sep:
        response = tail
    elif "<think>" in response:
        return None
    boxed = _last_boxed(response)
    if boxed is not None:
        return boxed.strip() or None
    lines = answer_lines(response)
    if lines:
        return lines[-1]
    if truncated:
        return None
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def _as_latex(answer: str) -> str:
    """Spell an answer the way math-verify's LaTeX parser reads it: units that are words dropped,
    1e-3 written as a power of ten."""
    s = _strip_wrappers(_plain(answer))
    s = _CURRENCY.sub("", _APPROX.sub("", s))
    s = _MIXED.sub(_mixed_as_fraction, s)
    s = _E_NOTATION.sub(r"\1\\times 10^{\2}", s)
    m = _NUMBER_THEN_UNIT.match(s) if values_stated(s) == 1 else None
    if m:
        words = re.findall(r"[A-Za-z]+", m.group(2))
        if all(len(w) > 1 or w in _SI_LETTERS for w in words):
            s = m.group(1)
    return s


def _mixed_as_fraction(m: re.Match) -> str:
    sign, whole = m.group(1), int(m.group(2))
    num, den = (int(m.group(3)), int(m.group(4))) if m.group(3) else (int(m.group(5)), int(m.group(6)))
    if den == 0 or num >= den:  # not a proper fraction: "3 4/2" is no mixed number; leave it as written
        return m.group(0)
    return f"{sign}\\frac{{{whole * den + num}}}{{{den}}}"


def values_stated(answer: str) -> int:
    """How many separate numbers an answer states: a fraction, a power or a mixed number is one."""
    s = _ONE_VALUE.sub("", _MIXED.sub("1", _strip_wrappers(answer)))
    return len(_NUMBER.findall(s))


def is_prose(answer: str) -> bool:
    """Whether words (not LaTeX commands or unit letters) surround the answer's value."""
    return bool(_WORD.findall(answer.replace("\\", " \\")))


def choice_letter(answer: str) -> str | None:
    """The letter of a lettered choice the answer starts with ("(B) 12" -> "B"), else None."""
    m = _CHOICE.match(_strip_wrappers(answer))
    return (m.group(1) or m.group(2)).upper() if m else None


def hedged_choice(answer: str) -> bool:
    """Whether a lettered choice is followed by another one it hedges with or lists ("A or B")."""
    s = _strip_wrappers(answer)
    m = _CHOICE.match(s)
    return bool(m and _MORE_CHOICES.match(s, m.end()))


def _unit_symbol(answer: str) -> str | None:
    """The unit symbol a number is followed by ("10 cm" -> "cm"), else None ("10", "10 apples")."""
    m = _NUMBER_THEN_UNIT.match(_strip_wrappers(answer))
    unit = m.group(2).strip() if m else ""
    return unit if _UNIT_SYMBOL.fullmatch(unit) else None


def _parse(answer: str):
    from math_verify import LatexExtractionConfig, parse

    try:
        return parse(f"${_as_latex(answer)}$", extraction_config=[LatexExtractionConfig()])
    except Exception:  # math-verify raises from deep inside sympy on odd input; unparseable is the answer
        return []


def _plain(text: str) -> str:
    """Compatibility forms folded (full-width digits, ½ as 1/2), any script's decimal digits (٣, ३)
    written as ASCII digits, √ as \\sqrt and "1 234" as 1234, so that the checker compares values,
    not code points."""
    text = unicodedata.normalize("NFKC", text).replace("\u2044", "/").replace("\u2212", "-")
    text = "".join(str(unicodedata.decimal(ch)) if not ch.isascii() and unicodedata.decimal(ch, None) is not None
                   else ch for ch in text)
    text = _ROOT_SIGN.sub(lambda m: "\\sqrt{%s}" % "".join(g or "" for g in m.groups()), text)
    return _SPACED_GROUPS.sub(lambda m: m.group(0).replace(" ", ""), text)


def _text(answer: str) -> str:
    return " ".join(_strip_wrappers(_plain(answer)).casefold().split())


def reference_answer(reference: str) -> str:
    """The value a reference states. GSM8K-style references are whole worked solutions ending in
    '#### 72', MATH-style ones box their result; either is cut to that value, since the worked text
    never equals a reply's final answer. A short reference is its own value."""
    text = str(reference).strip()
    if "####" in text:
        return _strip_wrappers(text.rpartition("####")[2].strip().partition("\n")[0])
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    # a reference that states its answer ("Answer: 7", "... so the answer is 7"); never its last
    # number, which in free text ("... about 2 million people") is no answer at all
    stated = answer_lines(text)
    return stated[-1] if stated else text


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """Whether an extracted answer equals the reference's value (see reference_answer): by letter
    where the reference is a lettered choice, as values where it is math, as case- and
    space-insensitive text where it is not ('mitochondria'). A prose answer that names several
    numbers ("3 or 4", "12 and 13") never equals a reference that is one number."""
    if not predicted or not reference or not str(reference).strip():
        return False
    reference = reference_answer(reference)
    if not reference:
        return False
    if _text(predicted) == _text(reference):  # the same text is the same answer ("True" and "true")
        return True
    predicted, reference = _plain(predicted), _plain(reference)
    gold_letter = choice_letter(reference)
    if gold_letter and (_strip_wrappers(reference).strip("()") == gold_letter or choice_letter(predicted)):
        return choice_letter(predicted) == gold_letter and not hedged_choice(predicted)
    units = _unit_symbol(predicted), _unit_symbol(reference)
    if all(units) and units[0] != units[1]:
        return False  # "10 m" against "10 cm": both name a unit, and not the same one
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold = _parse(str(reference))
    if not gold:
        return _text(predicted) == _text(str(reference))
    from math_verify import verify

    several = values_stated(predicted) > 1
    if several and (is_prose(predicted) or _RANGE.match(_strip_wrappers(predicted))) \
            and getattr(gold[0], "is_number", False):
        return False  # a hedge, a list in words or a range ("3-4"), against one value
    candidates = [predicted]
    numbers = _NUMBER.findall(predicted)
    if not several and len(numbers) == 1 and len(_WORD.findall(predicted.replace("\\", " \\"))) >= 2:
        candidates.append(numbers[0])  # a sentence around one number ("She has 7 apples"): that number
    if not several and is_prose(predicted):
        candidates.append(_TRAILING_WORDS.sub("", predicted))  # "\\frac{1}{2} cup": the value before its unit
    for candidate in candidates:
        pred = _parse(candidate)
        try:
            if pred and verify(gold, pred):
                return True
        except Exception:
            continue
    return False
