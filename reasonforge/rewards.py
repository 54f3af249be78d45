"""GRPO reward functions over verified answers, their registry, and the `--rewards` flag that picks them.

Each function has TRL's reward signature: `completions` (strings, or conversational lists of
messages) plus the dataset's columns as keyword arguments, one float per completion. Correctness
uses the checker evaluation uses (reasonforge.answers), so the number the run optimises is the
number evaluate_model.py reports.
"""

from __future__ import annotations

import math
from typing import Callable

from reasonforge.answers import answer_lines, answers_match, final_answer
from reasonforge.core import UserError

DEFAULT_REWARDS = "correctness=1,format=0.2"


def completion_text(completion) -> str:
    """The reply text of one completion: a string as it is, a conversation as its assistant turns
    (content split into parts is joined; a separated reasoning_content comes back as a closed
    <think> block, so the checks below see what the model wrote)."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion or []:
        if message.get("role", "assistant") != "assistant":
            continue
        reasoning = message.get("reasoning_content")
        if reasoning:
            parts.append(f"<think>{reasoning}</think>")
        content = message.get("content") or ""
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(content)
    return "\n".join(parts)


def correctness(completions, answer=None, truncated=None, **kwargs) -> list[float | None]:
    """1.0 where the completion's final answer equals the reference `answer`, else 0.0; None
    (TRL: not scored) where the row has no reference. A completion `truncated` by the length limit
    has an answer only where it boxed or stated one before the cut (answers.final_answer)."""
    references = answer if answer is not None else [None] * len(completions)
    cut = truncated if truncated is not None else [False] * len(completions)
    out: list[float | None] = []
    for completion, reference, was_cut in zip(completions, references, cut):
        if reference is None or not str(reference).strip():
            out.append(None)
            continue
        predicted = final_answer(completion_text(completion), truncated=bool(was_cut))
        out.append(1.0 if answers_match(predicted, str(reference)) else 0.0)
    return out


def think_closed(text: str) -> bool:
    """No <think> block, or the last one opened is closed. A reply may also start inside a block
    the prompt opened (Qwen3 with thinking forced): a lone </think> counts as closed."""
    opened = text.rfind("<think>")
    return opened < 0 or text.find("</think>", opened) >= 0


def explicit_answers(text: str) -> int:
    """How many answers the reply states outright after its thinking: \\boxed{} and 'answer: ...' lines."""
    reply = text.rpartition("</think>")[2]
    return reply.count("\\boxed{") + reply.count("\\fbox{") + len(answer_lines(reply))


def format_score(text: str, truncated: bool = False) -> float:
    """Half for a closed (or absent) thinking block, half for committing to one final answer.

    The answer half is 0.5 (so 0.25 of the total) where the answer is only a bare last number or
    is stated several times: the checker can still read it, but a reply should say it once.
    An unclosed <think> scores 0: the checker reads no answer from it at all.
    """
    if not think_closed(text):
        return 0.0
    if final_answer(text, truncated=truncated) is None:
        return 0.5
    return 0.5 + (0.5 if explicit_answers(text) == 1 else 0.25)


def format_reward(completions, truncated=None, **kwargs) -> list[float]:
    """One final answer present and any <think> block closed; see format_score for the partial credit."""
    cut = truncated if truncated is not None else [False] * len(completions)
    return [format_score(completion_text(c), bool(t)) for c, t in zip(completions, cut)]


# TRL names each reward's metrics after the function (rewards/<name>/mean); "format" would shadow a builtin as a def.
format_reward.__name__ = "format"

REWARDS: dict[str, Callable[..., list]] = {"correctness": correctness, "format": format_reward}


def _weight(name: str, raw: str, flag: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"{flag} weight {raw!r} of {name!r} is not a number; write it like {flag} {DEFAULT_REWARDS}")
    return value


def parse_rewards(spec: str, flag: str = "--rewards") -> dict[str, float]:
    """`correctness,format` or `correctness=1,format=0.2` -> {name: weight}, in the order given
    (weight 1 where none is written). UserError names the bad entry and the valid names."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        name, sep, raw = (s.strip() for s in part.partition("="))
        if name not in REWARDS:
            raise UserError(f"{flag}: unknown reward {name!r}; choose from {', '.join(REWARDS)}")
        if name in out:
            raise UserError(f"{flag} names {name!r} twice; give each reward once, like {flag} {DEFAULT_REWARDS}")
        out[name] = _weight(name, raw, flag) if sep else 1.0
    if not out:
        raise UserError(f"{flag} is empty; choose from {', '.join(REWARDS)}, like {flag} {DEFAULT_REWARDS}")
    if all(w == 0 for w in out.values()):
        raise UserError(f"{flag} {spec!r} gives every reward weight 0, so nothing would be learned; "
                        f"give at least one a weight, like {flag} {DEFAULT_REWARDS}")
    return out


def reward_functions(weights: dict[str, float]) -> tuple[list[Callable[..., list]], list[float]]:
    """The functions and weights, in matching order, that GRPOTrainer and GRPOConfig take."""
    unknown = [n for n in weights if n not in REWARDS]
    if unknown:
        raise UserError(f"unknown reward(s) {unknown}; choose from {', '.join(REWARDS)}")
    return [REWARDS[n] for n in weights], [float(w) for w in weights.values()]
