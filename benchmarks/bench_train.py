"""Training and inference speed of the suite against a plain QLoRA baseline, on one GPU.

    python benchmarks/bench_train.py --shape qwen2.5-3b --parts fixed,autobatch,varlen,inference \
        --out benchmarks/results

Each variant runs in its own process on identical data and settings (sequence length 2048,
micro-batch 2, gradient accumulation 4, LoRA r 16 on the seven projections, adamw_8bit):

- baseline: transformers + bitsandbytes NF4 (double quantisation, bf16 compute) + PEFT + SDPA
  + gradient checkpointing + TRL SFTTrainer, written out here on purpose;
- suite: the functions train_lora.py runs (utils.load_model, attach_lora, build_trainer);
- suite-auto: the same with --auto-batch's plan.

After warm-up steps it reports tokens/s, seconds per optimizer step, peak GPU memory, an MFU
estimate (4 x parameters FLOPs per token for a forward plus input-gradient pass, over the bf16
matmul rate measured on this GPU) and ratios against the baseline, as markdown and JSON.
Weights are random (make_model.py): speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

SEQ, MICRO, ACCUM = 2048, 2, 4


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def fixed_rows(n: int, seq: int, seed: int = 0) -> list[dict]:
    """Rows of exactly `seq` tokens; the first quarter is prompt (masked), the rest target."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(1000, 150000) for _ in range(seq)]
        cut = seq // 4
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return rows


def varlen_rows(n: int, seq: int, seed: int = 0) -> list[dict]:
    """Chat-like lengths: log-normal around 450 tokens, clipped to [64, seq]."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = int(min(seq, max(64, rng.lognormvariate(math.log(450), 0.7))))
        ids = [rng.randrange(1000, 150000) for _ in range(length)]
        cut = length // 3
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return rows


# ---------------------------------------------------------------------------------------------
# Workers (each in its own process)
# ---------------------------------------------------------------------------------------------


def timing_callback(warmup: int, store: dict):
    from transformers import TrainerCallback

    store["warmup"] = warmup

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            import torch

            if state.global_step == warmup:
                torch.cuda.synchronize()
                store["t0"], store["tok0"] = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            import torch

            torch.cuda.synchronize()
            store["t1"], store["tok1"], store["steps"] = time.perf_counter(), state.num_input_tokens_seen, state.global_step

    return Timer()


def load_rows(path: str):
    import datasets

    return datasets.Dataset.from_list(json.loads(Path(path).read_text()))


def worker_baseline(opts) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(opts.model, quantization_config=bnb, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map={"": 0})
    tok = AutoTokenizer.from_pretrained(opts.model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    cfg = SFTConfig(output_dir=opts.tmp, per_device_train_batch_size=opts.micro, gradient_accumulation_steps=opts.accum,
                    max_steps=opts.steps, learning_rate=2e-4, optim="adamw_8bit", bf16=True, logging_steps=1,
                    save_strategy="no", report_to=[], gradient_checkpointing=True,
                    gradient_checkpointing_kwargs={"use_reentrant": False}, max_length=SEQ, seed=0,
                    include_num_input_tokens_seen="non_padding", dataset_kwargs={"skip_prepare_dataset": True},
                    remove_unused_columns=False, padding_free=False, packing=False, disable_tqdm=True)
    store: dict = {}
    torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=load_rows(opts.data), processing_class=tok,
                         callbacks=[timing_callback(opts.warmup, store)])
    trainer.train()
    return finish(store, trainer, model)


def worker_suite(opts) -> dict:
    import utils

    utils.import_unsloth_first()
    import torch

    import train_lora

    argv = ["--model-name", opts.model, "--backend", "unsloth", "--max-seq-length", str(SEQ), "--batch-size",
            str(opts.micro), "--gradient-accumulation-steps", str(opts.accum), "--max-steps", str(opts.steps),
            "--save-steps", "1000000", "--optim", "adamw_8bit", "--output-dir", opts.tmp, "--seed", "0",
            "--gradient-checkpointing", opts.checkpointing]
    if opts.packing:
        argv.append("--packing")
    if opts.auto_batch:
        argv += ["--auto-batch"] + (["--gpu-memory-gib", str(opts.gpu_memory_gib)] if opts.gpu_memory_gib else [])
    args = train_lora.build_parser().parse_args(argv)
    args.run_name = "bench"
    model, tok, info = utils.load_model(opts.model, backend="unsloth", max_seq_length=SEQ)
    plan = train_lora.apply_auto_batch(args, model, info)
    model = train_lora.attach_lora(model, info, args)
    rows = load_rows(opts.data)
    store: dict = {}
    torch.cuda.reset_peak_memory_stats()
    trainer = train_lora.build_trainer(model, tok, rows, rows.select(range(2)), args, train_lora.precision_plan(info, args.gradient_checkpointing),
                                       "adamw_8bit")
    trainer.add_callback(timing_callback(opts.warmup, store))
    trainer.train()
    return {**finish(store, trainer, model), "plan": plan}


def finish(store: dict, trainer, model) -> dict:
    import torch

    measured_steps = store["steps"] - store["warmup"]
    seconds = store["t1"] - store["t0"]
    tokens = store["tok1"] - store["tok0"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    n_params = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens, "steps_measured": measured_steps,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "losses": losses, "parameters": n_params}


def worker_matmul(_opts) -> dict:
    """Measured dense bf16 matmul rate of this GPU, for the MFU denominator."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 50
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return {"bf16_tflops": 2 * 8192**3 * n / (time.perf_counter() - t0) / 1e12}


def worker_inference(opts) -> dict:
    """test_model.py --batch's generation path, batched against one prompt at a time, and
    evaluate_model.py's perplexity pass, on the same loaded model."""
    import utils

    utils.import_unsloth_first()
    import torch

    import evaluate_model

    model, tok, info = utils.load_model(opts.model, backend="unsloth", max_seq_length=SEQ)
    model = utils.prepare_for_inference(model, info["backend"])
    rng = random.Random(0)
    words = ["train", "price", "apple", "garden", "runner", "machine", "ticket", "answer", "total", "step"]
    convs = [[{"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))}]
             for _ in range(opts.prompts)]
    settings = utils.GenerationSettings(temperature=0, max_new_tokens=opts.new_tokens, repetition_penalty=1.0)
    utils.generate_batch(model, tok, convs[:2], settings, batch_size=2, desc=None)  # warm-up
    out = {}
    for name, bs in (("batched", opts.prompts), ("one_at_a_time", 1)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = utils.generate_batch(model, tok, convs, settings, batch_size=bs, desc=None)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        tokens = sum(r["tokens"] for r in res)
        out[name] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    rows = fixed_rows(64, 1024)
    t0 = time.perf_counter()
    ppl = evaluate_model.perplexity(model, rows, 8, tok.pad_token_id, "perplexity")
    torch.cuda.synchronize()
    out["perplexity"] = {"tokens": ppl["tokens"], "seconds": time.perf_counter() - t0,
                         "target_tokens_per_s": ppl["tokens"] / (time.perf_counter() - t0),
                         "input_tokens_per_s": 64 * 1024 / (time.perf_counter() - t0)}
    out["batched_speedup"] = out["batched"]["tokens_per_s"] / out["one_at_a_time"]["tokens_per_s"]
    out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


WORKERS = {"baseline": worker_baseline, "suite": worker_suite, "matmul": worker_matmul, "inference": worker_inference}


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------


_RESULTS_FILE: Path | None = None
_RESULTS: dict = {}


def run_worker(name: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", name] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"[{name}] failed:\n{tail}", file=sys.stderr)
        return {"error": tail[-500:]}
    result = json.loads(lines[-1][7:])
    _RESULTS.setdefault("runs", []).append({"worker": name, **{k: str(v) for k, v in kw.items()}, **result})
    if _RESULTS_FILE is not None:  # kept current, so a run cut short still leaves what it measured
        _RESULTS_FILE.write_text(json.dumps(_RESULTS, indent=2))
    print(f"[{name} {kw.get('micro', '')}x{kw.get('accum', '')} ckpt={kw.get('checkpointing', '')} "
          f"packing={kw.get('packing', '')}] {result.get('tokens_per_s', 0):,.0f} tok/s, "
          f"peak {result.get('peak_reserved_gib', 0):.2f} GiB ({time.time() - t0:.0f} s)", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-3b")
    p.add_argument("--model-dir", default=None, help="reuse a model folder (default: build one under /tmp)")
    p.add_argument("--parts", default="fixed", help="comma list of fixed, varlen")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per variant (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="steps not timed (default: %(default)s)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--grid", action="store_true", help="also time fixed micro-batch / checkpointing combinations")
    # worker-only options
    p.add_argument("--worker", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--tmp", default=None)
    p.add_argument("--micro", type=int, default=MICRO)
    p.add_argument("--accum", type=int, default=ACCUM)
    p.add_argument("--checkpointing", default="unsloth")
    p.add_argument("--packing", type=int, default=0)
    p.add_argument("--auto-batch", type=int, default=0)
    p.add_argument("--gpu-memory-gib", type=float, default=0)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    opts = p.parse_args(argv)
    if opts.worker:
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        print("RESULT " + json.dumps(WORKERS[opts.worker](opts)), flush=True)
        return 0
    return orchestrate(opts)


def orchestrate(opts) -> int:
    import make_model

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    model_dir = Path(opts.model_dir or tmp / opts.shape)
    if not (model_dir / "config.json").exists():
        make_model.build(opts.shape, model_dir)
    results: dict = {"shape": opts.shape, "seq": SEQ, "micro": MICRO, "accum": ACCUM, "steps": opts.steps,
                     "warmup": opts.warmup}
    global _RESULTS_FILE
    _RESULTS_FILE = out / f"bench_{opts.shape}_runs.json"
    results["gpu"] = run_worker("matmul")
    if "inference" in opts.parts:
        results["inference"] = run_worker("inference", model=model_dir, prompts=opts.prompts, new_tokens=opts.new_tokens)
    rows_needed = (opts.steps + 1) * MICRO * ACCUM * 4
    common = dict(model=model_dir, tmp=tmp / "run", warmup=opts.warmup, steps=opts.steps)
    if "fixed" in opts.parts:
        data = tmp / "fixed.json"
        data.write_text(json.dumps(fixed_rows(rows_needed, SEQ)))
        results["baseline"] = run_worker("baseline", data=data, **common)
        results["suite"] = run_worker("suite", data=data, checkpointing="unsloth", **common)
        if opts.grid:
            for micro, ckpt in [(8, "off"), (4, "off"), (8, "unsloth")]:
                results[f"suite_mb{micro}_{ckpt}"] = run_worker("suite", data=data, micro=micro,
                                                                accum=MICRO * ACCUM // micro, checkpointing=ckpt, **common)
    if "auto" in opts.parts:  # auto80, auto24, or both through "autobatch"
        data = tmp / "fixed.json"
        data.write_text(json.dumps(fixed_rows(rows_needed, SEQ)))
        if "auto80" in opts.parts or "autobatch" in opts.parts:
            results["suite_auto"] = run_worker("suite", data=data, auto_batch=1, **common)
        if "auto24" in opts.parts or "autobatch" in opts.parts:
            results["suite_auto_24gib"] = run_worker("suite", data=data, auto_batch=1, gpu_memory_gib=24, **common)
        ref = results.get("suite", {}).get("losses", [])
        for name in ("suite_auto", "suite_auto_24gib"):
            got = results.get(name, {}).get("losses", [])
            if ref and got:
                results[name]["max_rel_loss_diff_vs_suite"] = max(abs(a - b) / abs(a) for a, b in zip(ref, got))
    if "varlen" in opts.parts:
        data = tmp / "varlen.json"
        data.write_text(json.dumps(varlen_rows(rows_needed * 4, SEQ)))
        results["varlen_padded"] = run_worker("suite", data=data, packing=0, **common)
        results["varlen_packed"] = run_worker("suite", data=data, packing=1, **common)
    (out / f"bench_{opts.shape}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "losses"} if isinstance(v, dict) else v
                      for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
