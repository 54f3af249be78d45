"""Accuracies of several models on the same rows side by side, with whether each difference is
more than the number of rows can tell apart (an exact McNemar test on the rows where they disagree).

    python -m reasonforge.comparison sft=eval_results/evaluation.json grpo=eval_results/evaluation_grpo.json
"""

from __future__ import annotations

import json
import math
import sys


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact p-value that two models are equally accurate, from the rows only the first
    got right and the rows only the second got right (rows both got right or wrong say nothing)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(a: list[dict], b: list[dict]) -> dict:
    """Compare two verdict lists of evaluate_model.py's report, row by row (same rows, same order)."""
    if [v["reference"] for v in a] != [v["reference"] for v in b]:
        raise ValueError("the two reports scored different rows; evaluate both on the same --dataset-path and "
                         "--max-eval-samples")
    only_a = sum(x["correct"] and not y["correct"] for x, y in zip(a, b))
    only_b = sum(y["correct"] and not x["correct"] for x, y in zip(a, b))
    p = mcnemar_p(only_a, only_b)
    return {"only_first_right": only_a, "only_second_right": only_b, "p_value": round(p, 4),
            "distinguishable": p < 0.05}


def verdict(name_a: str, name_b: str, result: dict, rows: int) -> str:
    diff = f"{name_b} right on {result['only_second_right']} rows {name_a} missed, wrong on {result['only_first_right']} it got"
    if result["distinguishable"]:
        return f"{diff}: a real difference (p = {result['p_value']:.3g})"
    return f"{diff}: within what {rows} rows can tell apart (p = {result['p_value']:.2g})"


def main(argv: list[str] | None = None) -> int:
    pairs = [arg.split("=", 1) for arg in (argv if argv is not None else sys.argv[1:])]
    if not pairs or any(len(p) != 2 for p in pairs):
        print("usage: python -m reasonforge.comparison NAME=REPORT.json [NAME=REPORT.json ...]", file=sys.stderr)
        return 2
    reports = [(name, json.load(open(path))["metrics"]["accuracy"]) for name, path in pairs]
    base = reports[0][1].get("base")
    models = ([("base", base)] if base else []) + [(name, acc["finetuned"]) for name, acc in reports]
    rows = models[0][1]["total"]
    print(f"Answer accuracy on the same {rows} validation rows:")
    for name, acc in models:
        print(f"  {name:<6} {acc['correct']}/{acc['total']}")
    for (name_a, a), (name_b, b) in zip(models, models[1:]):
        print(f"  {name_b} vs {name_a}: {verdict(name_a, name_b, paired(a['verdicts'], b['verdicts']), rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
