"""Evaluation's measurements, for evaluate_model.py: which rows, perplexity with the training mask,
answer accuracy by the checker, sample replies, the trained-rows check and the printed summary."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

from reasonforge import answers, chat_format, core, generation, gguf, gguf_runtime, models, progress, s3
from reasonforge.core import UserError

log = logging.getLogger("reasonforge.eval")

SEED_DATASET = "./data_cache/processed_reasoning"  # data_preparation.py's --output-dir default


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def encode_rows(rows, tokenizer, args) -> tuple[list[dict], dict]:
    """Rows as training saw them: the same rendering and mask, and the same --long-rows policy
    (dropped rows are not scored; cut rows are scored on what is left). Returns (rows, counts)."""
    limit = args.max_seq_length
    # a multi-turn row whose template rewrites earlier turns is scored turn by turn, as it was trained
    encoded = [r for m in rows["messages"] for r in chat_format.encode_rows(m, tokenizer, args.train_on_responses_only, limit)]
    over = sum(1 for r in encoded if r["n_tokens"] > limit)
    out = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in encoded
           if chat_format.keeps_row(r, limit, args.long_rows)]
    if over:
        log.warning("%d of %d rows are longer than --max-seq-length %d: %s (as in training, --long-rows %s)",
                    over, len(encoded), args.max_seq_length, "not scored" if args.long_rows == "drop" else "cut",
                    args.long_rows)
    if not out:
        raise UserError(f"no row of the split fits --max-seq-length {args.max_seq_length}; raise it")
    return out, {"rows": len(rows), "rows_scored_as": len(encoded), "over_max_seq_length": over, "scored": len(out)}


def perplexity(model, encoded: list[dict], batch_size: int, pad_id: int, desc: str) -> dict:
    """exp(sum NLL / sum target tokens); the same shift and mask as the training loss."""
    import torch
    import torch.nn.functional as F
    total_nll, total_tokens = 0.0, 0
    if getattr(model, "is_gguf", False):  # llama.cpp scores one row at a time, on the same ids and mask
        with progress.bar(total=len(encoded), desc=desc, unit="row") as bar:
            for r in encoded:
                nll, count = model.nll(r["input_ids"], r["labels"])
                total_nll, total_tokens = total_nll + nll, total_tokens + count
                bar.update(1)
                bar.set_postfix(ppl=f"{math.exp(total_nll / max(total_tokens, 1)):.3f}")
        loss = total_nll / max(total_tokens, 1)
        return {"perplexity": math.exp(loss), "avg_loss": loss, "tokens": total_tokens, "samples": len(encoded)}
    device = model.device
    with progress.bar(total=len(encoded), desc=desc, unit="row") as bar, torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start:start + batch_size]
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, r in enumerate(batch):
                n = len(r["input_ids"])
                ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1).to(device)
            total_nll += F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum").item()
            total_tokens += int((shift_labels != -100).sum())
            bar.update(len(batch))
            bar.set_postfix(ppl=f"{math.exp(total_nll / max(total_tokens, 1)):.3f}")
    loss = total_nll / max(total_tokens, 1)
    return {"perplexity": math.exp(loss), "avg_loss": loss, "tokens": total_tokens, "samples": len(encoded)}


def prompt_of(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """The conversation up to (not including) its last assistant turn."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = chat_format.clean_messages(messages[:last])
    if system_prompt and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": system_prompt})
    return prompt


def accuracy(model, tokenizer, rows, settings, args, desc: str) -> dict:
    prompts = [prompt_of(m, args.system_prompt) for m in rows["messages"]]
    speed: dict = {}
    outs = generation.generate_batch(model, tokenizer, prompts, settings, args.batch_size, desc=desc, engine=args.engine,
                                stats=speed)
    verdicts = []
    for out, reference in zip(outs, rows["answer"]):
        # a reply the token limit cut off has no answer unless it already stated one
        predicted = answers.final_answer(out["response"], truncated=not out["stopped"])
        verdicts.append({"reference": answers.reference_answer(reference), "predicted": predicted,
                         "correct": answers.answers_match(predicted, reference), "stopped": out["stopped"],
                         "response": out["response"]})
    correct = sum(v["correct"] for v in verdicts)
    return {"accuracy": correct / len(verdicts), "correct": correct, "total": len(verdicts), "settings": settings.as_dict(),
            "no_answer": sum(v["predicted"] is None for v in verdicts),
            "hit_max_new_tokens": sum(not v["stopped"] for v in verdicts), "generation_speed": speed,
            "verdicts": verdicts}


def accuracy_settings(settings, penalty_given: bool):
    """Greedy, and with no repetition penalty unless --repetition-penalty was passed: a penalty
    keeps a model from repeating digits an answer needs (11 + 11 = 22)."""
    return generation.GenerationSettings(**{**settings.as_dict(), "temperature": 0.0,
                                       "repetition_penalty": settings.repetition_penalty if penalty_given else 1.0})


def adapter_off(model):
    """Context in which the model runs as its base (adapter layers bypassed)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------


def dataset_to_evaluate(args) -> tuple[str, str]:
    """(--dataset-path, where it came from): the flag; else the dataset the adapter recorded (its
    local folder, or its S3 URI, fetched once into the cache); else data_preparation.py's default."""
    if args.dataset_path:
        return args.dataset_path, "--dataset-path"
    if gguf.is_gguf(args.model_path):
        recorded = (gguf_runtime.export_info(Path(args.model_path)).get("run_info") or {}).get("dataset_path")
    else:
        info = models.read_adapter_info(args.model_path) if core.path_kind(args.model_path) == "local" and \
            Path(args.model_path).is_dir() else None
        recorded = ((info or {}).get("reasonforge") or {}).get("dataset_path")
    if recorded and (core.path_kind(recorded) == "s3" or Path(recorded).is_dir()):
        return recorded, "recorded by the adapter"
    if recorded:
        raise UserError(f"the adapter trained on {recorded}, which is not on this machine; pass --dataset-path "
                        "with that data (or its s3:// URI) to evaluate on it")
    return SEED_DATASET, f"default ({SEED_DATASET})"


def load_eval_split(args):
    dd, manifest = chat_format.load_prepared_dataset(s3.fetch_if_s3(args.dataset_path))
    if args.split not in dd:
        raise UserError(f"split {args.split!r} not in {args.dataset_path} (has {list(dd)}); pass --split")
    rows = dd[args.split]
    if args.max_eval_samples:
        rows = rows.select(range(min(args.max_eval_samples, len(rows))))
    return rows, manifest


def trained_rows_check(rows, args, manifest: dict, run_info: dict) -> dict | None:
    """Whether the evaluated rows may be rows the adapter trained on, which inflates every number.

    Same prepared data as training: only --split train is. Other data: the prompts of this split
    are looked up in the training folder the adapter recorded, where that folder is on this machine.
    """
    trained_on = run_info.get("dataset_manifest_sha256")
    if not trained_on:
        return None  # a plain model, or an adapter trained elsewhere: nothing recorded to compare
    if trained_on == manifest.get("content_sha256"):
        if args.split != "train":
            return {"same_dataset_as_training": True, "rows_seen_in_training": 0, "of": len(rows)}
        return {"same_dataset_as_training": True, "rows_seen_in_training": len(rows), "of": len(rows),
                "warning": "--split train is the data this adapter trained on: every number below measures "
                           "recall of training rows, not generalisation; evaluate --split validation"}
    from reasonforge.conversations import prompt_key

    path = run_info.get("dataset_path")
    source = Path(path) if path and core.path_kind(path) == "local" else None
    recorded = None
    if source is not None:
        with contextlib.suppress(core.CorruptFile):  # missing or damaged: not the folder it trained on
            recorded = core.read_json(source / "manifest.json", "dataset manifest").get("content_sha256")
    if recorded != trained_on:  # gone, remote, or prepared again in place since: its rows are not the trained ones
        fix = (f"; to evaluate on the data it trained on, pass --dataset-path {path} (or leave --dataset-path out)"
               if path and not (source is not None and recorded) else "")
        if recorded:
            where = f"{path} has been prepared again since training"
        elif path and core.path_kind(path) == "s3":
            where = f"it trained on {path}"
        else:
            where = f"it trained on {path or 'data not recorded'}, which is not on this machine"
        return {"same_dataset_as_training": False, "rows_seen_in_training": None, "of": len(rows),
                "warning": f"--dataset-path {args.dataset_path} is not the data this adapter trained on ({where}), "
                           f"so rows it trained on cannot be ruled out and would inflate every number{fix}"}
    train, _ = chat_format.load_prepared_dataset(source)
    seen = {prompt_key(m) for m in train["train"]["messages"]}
    overlap = sum(prompt_key(m) in seen for m in rows["messages"])
    out = {"same_dataset_as_training": False, "rows_seen_in_training": overlap, "of": len(rows),
           "training_dataset": str(source)}
    if overlap:
        out["warning"] = (f"{overlap} of the {len(rows)} rows evaluated have a prompt the adapter trained on "
                          f"(in {source}); their scores measure recall, not generalisation: evaluate the "
                          "validation split of the dataset it trained on")
    return out


def run_measurements(model, tokenizer, rows, args, settings, has_adapter: bool) -> dict:
    metrics: dict = {}
    timings: dict = {}
    passes = [("finetuned" if has_adapter else "model", False)] + ([("base", True)] if has_adapter and args.compare_base else [])
    if args.compute_perplexity:
        encoded, metrics["perplexity_rows"] = encode_rows(rows, tokenizer, args)
        for name, base in passes:
            t0 = time.perf_counter()
            with adapter_off(model) if base else contextlib.nullcontext():
                metrics.setdefault("perplexity", {})[name] = perplexity(model, encoded, args.batch_size or 8,
                                                                        tokenizer.pad_token_id, f"perplexity ({name})")
            timings[f"perplexity_{name}_s"] = round(time.perf_counter() - t0, 2)
        ppl = metrics["perplexity"]
        if "base" in ppl:
            ppl["improvement_percent"] = 100 * (ppl["base"]["perplexity"] - ppl["finetuned"]["perplexity"]) / ppl["base"]["perplexity"]
    if args.compute_accuracy:
        # a reference of 0 or False is an answer too: only missing or blank ones are left out
        answers_of = rows["answer"] if "answer" in rows.column_names else []
        scored = rows.select([i for i, a in enumerate(answers_of) if a is not None and str(a).strip() != ""])
        if len(scored) == 0:
            raise UserError(f"--compute-accuracy: no rows of split {args.split!r} have a reference answer "
                            "(the data-preparation 'answer' column); drop the flag or prepare data with answers")
        greedy = accuracy_settings(settings, args.repetition_penalty_given)
        for name, base in passes:
            t0 = time.perf_counter()
            with adapter_off(model) if base else contextlib.nullcontext():
                metrics.setdefault("accuracy", {})[name] = accuracy(model, tokenizer, scored, greedy, args,
                                                                    f"answers ({name})")
            timings[f"accuracy_{name}_s"] = round(time.perf_counter() - t0, 2)
    return {"metrics": metrics, "timings": timings}


def samples(model, tokenizer, rows, args, settings, speed: dict) -> list[dict]:
    """Replies to the first --num-samples rows beside their reference; `speed` receives the figures."""
    picked = rows.select(range(min(args.num_samples, len(rows))))
    prompts = [prompt_of(m, args.system_prompt) for m in picked["messages"]]
    outs = generation.generate_batch(model, tokenizer, prompts, settings, args.batch_size, desc="samples",
                                engine=args.engine, stats=speed)
    result = []
    for prompt, messages, out in zip(prompts, picked["messages"], outs):
        last = [m for m in messages if m["role"] == "assistant"][-1]
        truth = (f"<think>\n{last['reasoning_content']}\n</think>\n\n" if last.get("reasoning_content") else "") + last["content"]
        result.append({"instruction": prompt[-1]["content"], "ground_truth": truth, "generated": out["response"],
                       "tokens": out["tokens"], "seconds": out["seconds"]})
    return result


def print_summary(report: dict, output_file: Path) -> None:
    m = report["metrics"]
    leak = report.get("trained_rows_check") or {}
    if leak.get("warning"):  # beside the numbers it qualifies, where it cannot scroll away
        print(f"warning: {leak['warning']}")
    for name, r in m.get("perplexity", {}).items():
        if isinstance(r, dict):
            # three decimals for every model, so that 1.050 and 4.918 line up as numbers of one kind
            print(f"Perplexity ({name}): {r['perplexity']:.3f} (avg loss {r['avg_loss']:.4f}, "
                  f"{r['tokens']} tokens, {r['samples']} samples)")
    if "improvement_percent" in m.get("perplexity", {}):
        print(f"Perplexity improvement over base: {m['perplexity']['improvement_percent']:.2f}%")
    for name, r in m.get("accuracy", {}).items():
        print(f"Answer accuracy ({name}): {r['accuracy']:.3f} ({r['correct']}/{r['total']}; "
              f"{r['no_answer']} without an answer, {r['hit_max_new_tokens']} cut at --max-new-tokens)")
        speed = r.get("generation_speed") or {}
        if speed.get("tokens_per_s"):
            print(f"  generated {speed['tokens']} tokens in {speed['seconds']:.1f} s ({speed['tokens_per_s']:,.0f} "
                  f"tokens/s; engine {speed['engine']}, batch {speed['batch_size']})")
    print(f"Report: {output_file.resolve()}")
