"""What each bench_train.py worker process runs and measures: the benchmark rows, the timing and profiling callbacks, the trace analysis and the baseline, suite, matmul and inference workers.

Imported through bench_train.py, which puts the repository root on sys.path first: the workers
import train_lora, utils and reasonforge inside their functions.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from pathlib import Path

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


def chat_length(rng: random.Random, seq: int) -> int:
    """Chat-like lengths: log-normal around 450 tokens, clipped to [64, seq]."""
    return int(min(seq, max(64, rng.lognormvariate(math.log(450), 0.7))))


def varlen_rows(n: int, seq: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = chat_length(rng, seq)
        ids = [rng.randrange(1000, 150000) for _ in range(length)]
        cut = length // 3
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return rows


# ---------------------------------------------------------------------------------------------
# Workers (each in its own process)
# ---------------------------------------------------------------------------------------------


def synchronize() -> None:
    """Wait for the GPU's queued work, so that a clock read after it covers that work (a no-op on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timing_callback(warmup: int, store: dict):
    from transformers import TrainerCallback

    store["warmup"] = warmup

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup:
                synchronize()
                store["t0"], store["tok0"] = time.perf_counter(), state.num_input_tokens_seen
                store["graphs0"] = compiled_graphs()

        def on_step_end(self, args, state, control, **kw):
            synchronize()
            now = time.perf_counter()
            if state.global_step > warmup:  # per-step times show compilation or stalls inside the window
                store.setdefault("step_seconds", []).append(round(now - store["t1"], 4))
            store["t1"], store["tok1"], store["steps"] = now, state.num_input_tokens_seen, state.global_step
            store["graphs1"] = compiled_graphs()

    return Timer()


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far; a rise inside the timed window means
    shapes are still changing and the window pays compilation."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# Kernel-name patterns, first match wins: where a step's GPU time goes.
KERNEL_CATEGORIES = [
    ("dequantise 4-bit", r"dequant|nf4|fp4"),
    ("attention", r"flash|fmha|attention|attn|sdpa|cudnn"),
    ("loss (lm head cross-entropy)", r"cross_entropy|crossentropy|log_softmax|logsumexp|nll_loss|_cce|^_fl_|^_(forward|backward)_kernel$"),
    ("optimizer", r"optimizer|adam|multi_tensor|foreach"),
    ("host<->device copies (offload)", r"memcpy htod|memcpy dtoh|pinned"),
    ("matmul", r"gemm|xmma|cutlass|nvjet|sm90_|sm80_|cublas|matmul|splitk|gemv"),
    ("triton (fused norm, rope, swiglu, lora)", r"triton|_fwd_kernel|_bwd_kernel|_fg_kernel|rms|rope|swiglu|geglu"),
    ("dtype casts and device copies", r"copy_kernel|memcpy dtod|memset|_to_copy"),
    ("elementwise and reductions", r"elementwise|vectorized|reduce|unrolled|cat|index|fill|where|mul|add"),
]
GPU_EVENT_KINDS = ("kernel", "gpu_memcpy", "gpu_memset")


def categorise_kernel(name: str) -> str:
    low = name.lower()
    for label, pattern in KERNEL_CATEGORIES:
        if re.search(pattern, low):
            return label
    return "other"


def analyse_trace(path: str, top: int = 15) -> dict:
    """A Chrome trace of one optimizer step -> GPU time per category, the top kernels, and how much
    of the step the GPU sat idle (gaps between kernels: time the CPU took to issue work)."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as fh:
        events = [e for e in json.load(fh)["traceEvents"] if e.get("cat") in GPU_EVENT_KINDS and "dur" in e]
    if not events:
        raise ValueError(f"{path}: no GPU kernels in the trace")
    per_kernel: dict[str, list] = {}
    for e in events:
        acc = per_kernel.setdefault(e["name"], [0.0, 0])
        acc[0] += e["dur"] / 1000
        acc[1] += 1
    events.sort(key=lambda e: e["ts"])
    busy_us, gaps, cur_start, cur_end = 0.0, [], events[0]["ts"], events[0]["ts"] + events[0]["dur"]
    for e in events[1:]:
        if e["ts"] > cur_end:
            busy_us += cur_end - cur_start
            gaps.append(e["ts"] - cur_end)
            cur_start = e["ts"]
        cur_end = max(cur_end, e["ts"] + e["dur"])
    busy_us += cur_end - cur_start
    span_ms = (cur_end - events[0]["ts"]) / 1000
    category = {name: categorise_kernel(name) for name in per_kernel}
    by_cat: dict[str, float] = {}
    for name, (ms, _) in per_kernel.items():
        by_cat[category[name]] = by_cat.get(category[name], 0.0) + ms
    kernel_ms = sum(by_cat.values())
    return {"span_ms": span_ms, "gpu_busy_ms": busy_us / 1000, "gpu_idle_share": 1 - busy_us / 1000 / span_ms,
            "kernel_ms": kernel_ms, "launches": len(events), "idle_gaps": len(gaps),
            "idle_in_gaps_under_200us_ms": sum(g for g in gaps if g < 200) / 1000,
            "categories": [{"category": k, "ms": v, "share_of_kernel_time": v / kernel_ms}
                           for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])],
            "top_kernels": [{"name": n[:120], "ms": v[0], "calls": v[1], "category": category[n]}
                            for n, v in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]]}


def profile_callback(warmup: int, store: dict):
    """Traces optimizer step `warmup` (after the warm-up and compilation) with torch.profiler."""
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kw):
            import torch

            if state.global_step == warmup and self.prof is None:
                torch.cuda.synchronize()
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
                self.prof.start()

        def on_step_end(self, args, state, control, **kw):
            import torch

            if self.prof is None or "profile" in store:
                return
            torch.cuda.synchronize()
            self.prof.stop()
            self.prof.export_chrome_trace(store["trace"])
            store["profile"] = analyse_trace(store["trace"])
            control.should_training_stop = True

    return Profile()


def load_rows(path: str):
    import datasets

    return datasets.Dataset.from_list(json.loads(Path(path).read_text()))


def qlora_baseline(model_path: str):
    """The plain QLoRA model every baseline times: bitsandbytes NF4 (double quantisation, bf16
    compute), SDPA, gradient checkpointing, PEFT LoRA r 16 on the seven projections. (model, tokenizer)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=bnb, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map={"": 0})
    tok = AutoTokenizer.from_pretrained(model_path)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    return model, tok


def worker_baseline(opts) -> dict:
    import torch
    from trl import SFTConfig, SFTTrainer

    model, tok = qlora_baseline(opts.model)
    cfg = SFTConfig(output_dir=opts.tmp, per_device_train_batch_size=opts.micro, gradient_accumulation_steps=opts.accum,
                    max_steps=opts.steps, learning_rate=2e-4, optim="adamw_8bit", bf16=True, logging_steps=1,
                    save_strategy="no", report_to=[], gradient_checkpointing=True,
                    gradient_checkpointing_kwargs={"use_reentrant": False}, max_length=SEQ, seed=0,
                    include_num_input_tokens_seen="non_padding", dataset_kwargs={"skip_prepare_dataset": True},
                    remove_unused_columns=False, padding_free=False, packing=False, disable_tqdm=True)
    store: dict = {"trace": opts.trace_file or str(Path(opts.tmp) / "trace.json.gz")}
    torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=load_rows(opts.data), processing_class=tok,
                         callbacks=[measure_callback(opts, store)])
    trainer.train()
    return measurements(store, trainer, model)


def worker_suite(opts) -> dict:
    """train_lora.py's own run on the benchmark's rows: the script's flags and checks, then
    reasonforge.training's setup, train and finish, with the timer beside the run's own callbacks."""
    import train_lora
    import utils
    from reasonforge import training

    # --graph-wrapper cpp: the steady-rate parts time the long-run choice.
    argv = ["--model-name", opts.model, "--backend", opts.backend, "--max-seq-length", str(SEQ), "--batch-size",
            str(opts.micro), "--gradient-accumulation-steps", str(opts.accum), "--max-steps", str(opts.steps),
            "--save-steps", "1000000", "--optim", opts.optim, "--output-dir", str(Path(opts.tmp) / "train_lora"), "--run-name", "bench",
            "--seed", "0", "--gradient-checkpointing", opts.checkpointing, "--graph-wrapper", "cpp"]
    if opts.packing:
        argv.append("--packing")
    if opts.auto_batch:
        argv += ["--auto-batch"] + (["--gpu-memory-gib", str(opts.gpu_memory_gib)] if opts.gpu_memory_gib else [])
    args = train_lora.build_parser().parse_args(argv)
    utils.setup_logging(args.verbose)
    train_lora.validate_args(args)
    rows = json.loads(Path(opts.data).read_text())
    store: dict = {"trace": opts.trace_file or str(Path(opts.tmp) / "trace.json.gz")}
    try:
        run = training.setup(training.TrainConfig.from_args(args), argv, pretokenized=(rows, rows[:2]))
        result = training.train(run, callbacks=[measure_callback(opts, store)])
        training.finish(run, result)
    finally:
        utils.RunLock.release_all()  # train_lora.main's cli_entry does this for the script
    return {**measurements(store, result.trainer, run.model), "plan": run.batch.auto,
            "packed_attention": run.packed_attention}


def measure_callback(opts, store: dict):
    return profile_callback(opts.warmup, store) if opts.profile else timing_callback(opts.warmup, store)


def measurements(store: dict, trainer, model) -> dict:
    import torch

    if "profile" in store:
        return {"profile": store["profile"], "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}
    measured_steps = store["steps"] - store["warmup"]
    seconds = store["t1"] - store["t0"]
    tokens = store["tok1"] - store["tok0"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    n_params = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens, "steps_measured": measured_steps,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "losses": losses, "parameters": n_params, "step_seconds": store.get("step_seconds", []),
            "graphs_compiled_while_timed": store.get("graphs1", 0) - store.get("graphs0", 0)}


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
