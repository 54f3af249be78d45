"""Generation speed: today's path (transformers/Unsloth `generate`) against reasonforge.engine, one GPU.

    taskset -c 0-3 python benchmarks/bench_generation.py --shape qwen2.5-3b --out benchmarks/results

One random-weight model of the shape (make_model.py) with a LoRA adapter of rank 16 on the seven
projections (random B, so the adapter changes the outputs), loaded 4-bit as evaluate_model.py and
test_model.py load it, unmerged. Each variant runs in its own process on the same prompts:

- generate-unsloth: the CLIs' path before the engine (Unsloth's loader and fast decode, `generate`);
- generate-hf: transformers' `generate` on the model the engine uses (--backend hf);
- static: reasonforge.engine on that model (static KV cache, the decode step replayed as a CUDA graph,
  decode attention on the grouped KV heads);
- static-repeat-kv: the same with transformers' SDPA attention, which copies KV heads to every query head;
- static-bf16: the same with the base in 16 bits (--no-4bit), the explicit faster-but-larger option;
- continuous: transformers' continuous batching (`generate_batch`), for comparison.

Tasks, as the CLIs run them: evaluation (--rows prompts x --new-tokens, greedy, batch 8 as the old
default and the engine's own default), GRPO rollouts (one group of --group, then --prompts-per-step
groups at once, temperature 1), and one chat reply (time to first token and per token). Greedy
replies are compared across variants row by row. Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

VARIANTS = ("generate-unsloth", "generate-hf", "static", "static-repeat-kv", "static-bf16", "static-compiled",
            "continuous")
WORDS = ["train", "price", "apple", "garden", "runner", "machine", "ticket", "answer", "total", "step", "river",
         "number", "seven", "twelve", "speed", "hour", "metre", "cost", "share", "people"]


def prompts(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    return [[{"role": "user", "content": "Question: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 60)))
              + "?"}] for _ in range(n)]


def make_assets(shape: str, model_dir: Path) -> tuple[Path, Path]:
    """The random model and a random LoRA adapter beside it (made once, reused)."""
    import torch

    adapter = model_dir / "adapter"
    if (adapter / "adapter_config.json").is_file():
        return model_dir, adapter
    import make_model
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from reasonforge.models import tolerate_old_torchao

    tolerate_old_torchao()
    make_model.build(shape, model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, lora)
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    peft_model.save_pretrained(str(adapter))
    return model_dir, adapter


# ---------------------------------------------------------------------------------------------
# Worker: one variant in its own process
# ---------------------------------------------------------------------------------------------


def timed(fn):
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def worker(opts) -> dict:
    import utils

    variant = opts.worker
    backend = "unsloth" if variant == "generate-unsloth" else "hf"
    if backend == "unsloth":
        utils.import_unsloth_first()
    import torch

    t0 = time.perf_counter()
    model, tok, info = utils.load_model(opts.model, backend=backend, load_in_4bit=variant != "static-bf16",
                                        adapter_path=opts.adapter)
    model = utils.prepare_for_inference(model, info["backend"])
    load_s = time.perf_counter() - t0
    engine = "static" if variant.startswith("static") else "generate"
    greedy = utils.GenerationSettings(temperature=0, max_new_tokens=opts.new_tokens, repetition_penalty=1.0)
    sampled = utils.GenerationSettings(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=opts.new_tokens,
                                       repetition_penalty=1.0)
    if variant == "static-compiled":
        from reasonforge.engine import Engine

        model._reasonforge_engine = Engine(model, tok.pad_token_id, compile_step=True)
    if variant == "static-repeat-kv":
        from reasonforge.engine import Engine

        model._reasonforge_engine = Engine(model, tok.pad_token_id, grouped_attention=False)
    rows = prompts(opts.rows)
    out: dict = {"variant": variant, "load_s": round(load_s, 1), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}

    def run(name, convs, settings, batch_size):
        if variant == "continuous":
            return continuous(model, tok, convs, settings, name, out)
        stats: dict = {}
        res, seconds = timed(lambda: utils.generate_batch(model, tok, convs, settings, batch_size, desc=None,
                                                          engine=engine, stats=stats))
        tokens = sum(r["tokens"] for r in res)
        out[name] = {"rows": len(convs), "tokens": tokens, "seconds": round(seconds, 3),
                     "tokens_per_s": round(tokens / seconds, 1), "stats": stats}
        print(f"[{variant}] {name}: {len(convs)} rows, {tokens} tokens in {seconds:.2f} s "
              f"= {tokens / seconds:,.0f} tok/s  {json.dumps({k: stats.get(k) for k in ('batch_size', 'decode_ms_per_step', 'replay_ms', 'grouped_attention', 'capture_s', 'prefill_s')})}",
              flush=True)
        return res

    if opts.profile and variant in ("static", "static-repeat-kv"):
        try:
            out["profile"] = profile_steps(model, tok, rows, greedy, grouped=variant == "static")
        except Exception as exc:  # the timings below matter more than the profile
            out["profile"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"[{variant}] profile failed: {out['profile']['error']}", flush=True)
    if variant == "static-compiled":  # one shape only: every new shape compiles again
        run("eval_default_with_compile", rows, greedy, None)
        out["greedy_replies"] = [r["response"] for r in run("eval_default", rows, greedy, None)]
        return out
    run("warmup", rows[:2], greedy, 2)
    if opts.quick:  # the profile and the default evaluation only, with its greedy replies for the comparison
        out["greedy_replies"] = [r["response"] for r in run("eval_default", rows, greedy,
                                                            None if engine == "static" else opts.rows)]
        return out
    # evaluation: batch 8 (the old default; today's path only on a quarter of the rows, at the same rate per batch)
    few = rows[: opts.rows // 4] if variant in ("generate-unsloth", "generate-hf") else rows
    if variant != "generate-hf":  # that one is here for its greedy replies; its speed is the Unsloth path's or worse
        run("eval_batch8", few, greedy, 8)
    replies = run("eval_default", rows, greedy, None if engine == "static" else opts.rows)
    out["greedy_replies"] = [r["response"] for r in replies]
    if variant == "generate-hf":
        return out
    group = [rows[0]] * opts.group
    run("grpo_one_group", group, sampled, opts.group)
    many = [r for r in rows[: opts.prompts_per_step] for _ in range(opts.group)]
    run("grpo_groups", many, sampled, len(many))
    out["chat"] = chat_latency(model, tok, rows[1], engine, variant)
    out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2) if torch.cuda.is_available() else None
    return out


def profile_steps(model, tok, rows, greedy, grouped: bool = True) -> dict:
    """Kernels and GPU time of eager decode steps at batch --rows (16 new tokens), by kernel name:
    what a replayed graph still has to run, launch overhead aside."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import utils
    from reasonforge.engine import Engine

    engine = Engine(model, tok.pad_token_id, cuda_graphs=False, grouped_attention=grouped)
    convs = [[{"role": "user", "content": r[0]["content"]}] for r in rows]
    ids = [tok(utils.render_chat(c, tokenizer=tok, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
           for c in convs]
    settings = utils.GenerationSettings(temperature=0, max_new_tokens=2, repetition_penalty=1.0)
    stops = set(utils.stop_token_ids(tok, model))
    engine.generate(ids, settings, stops, batch_size=len(ids))  # warm
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate(ids, settings, stops, batch_size=len(ids))
        torch.cuda.synchronize()
    settings17 = utils.GenerationSettings(temperature=0, max_new_tokens=17, repetition_penalty=1.0)
    with profile(activities=[ProfilerActivity.CUDA]) as prof17:
        engine.generate(ids, settings17, stops, batch_size=len(ids))
        torch.cuda.synchronize()

    def kernels(p):
        out = {}
        for e in p.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                n, t = out.get(e.name, (0, 0.0))
                out[e.name] = (n + 1, t + e.device_time_total)
        return out

    a, b = kernels(prof), kernels(prof17)
    per_step = {k: ((b[k][0] - a.get(k, (0, 0))[0]) / 15, (b[k][1] - a.get(k, (0, 0.0))[1]) / 15 / 1000) for k in b}
    top = sorted(per_step.items(), key=lambda kv: -kv[1][1])[:15]
    result = {"kernels_per_step": round(sum(n for n, _ in per_step.values()), 1),
              "gpu_ms_per_step": round(sum(t for _, t in per_step.values()), 3),
              "top": [{"kernel": k[:90], "per_step": round(n, 1), "ms": round(t, 3)} for k, (n, t) in top]}
    print(f"profile: {result['kernels_per_step']} kernels and {result['gpu_ms_per_step']} ms of GPU time per decode step "
          f"at batch {len(ids)}", flush=True)
    for row in result["top"]:
        print(f"  {row['ms']:7.3f} ms  x{row['per_step']:6.1f}  {row['kernel']}", flush=True)
    return result


def chat_latency(model, tok, conv, engine, variant) -> dict:
    """One greedy reply: the time to the first token (a 1-token reply) and the time per token after it."""
    import utils

    if variant == "continuous":
        return {}
    first = utils.GenerationSettings(temperature=0, max_new_tokens=1, repetition_penalty=1.0)
    full = utils.GenerationSettings(temperature=0, max_new_tokens=128, repetition_penalty=1.0)
    utils.generate_batch(model, tok, [conv], full, 1, desc=None, engine=engine)  # the one-row graph, captured
    _, t1 = timed(lambda: utils.generate_batch(model, tok, [conv], first, 1, desc=None, engine=engine))
    res, tn = timed(lambda: utils.generate_batch(model, tok, [conv], full, 1, desc=None, engine=engine))
    n = res[0]["tokens"]
    per = (tn - t1) / max(n - 1, 1)
    print(f"[{variant}] chat: first token {1000 * t1:.1f} ms, then {1000 * per:.2f} ms/token ({n} tokens)", flush=True)
    return {"first_token_ms": round(1000 * t1, 1), "ms_per_token": round(1000 * per, 2), "tokens": n,
            "tokens_per_s": round(n / tn, 1)}


def continuous(model, tok, convs, settings, name, out):
    """transformers' continuous batching with CUDA graphs, as TRL's use_transformers_continuous_batching calls it."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    import utils

    ids = [tok(utils.render_chat(c, tokenizer=tok, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
           for c in convs]
    sample = settings.temperature > 0
    gen = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=sample, eos_token_id=utils.stop_token_ids(tok, model),
                           pad_token_id=tok.pad_token_id, **({"temperature": settings.temperature, "top_p": 1.0, "top_k": 0}
                                                             if sample else {}))
    cfg = ContinuousBatchingConfig(use_cuda_graph=True, max_memory_percent=0.5)
    try:
        result, seconds = timed(lambda: model.generate_batch(ids, generation_config=gen, continuous_batching_config=cfg,
                                                             progress_bar=False))
    except Exception as exc:  # report and go on: this variant is a comparison, not the suite's path
        out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(f"[continuous] {name}: failed: {out[name]['error']}", flush=True)
        return [{"response": "", "tokens": 0}] * len(convs)
    outs = list(result.values())
    tokens = sum(len(o.generated_tokens) for o in outs)
    out[name] = {"rows": len(convs), "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}
    print(f"[continuous] {name}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:,.0f} tok/s", flush=True)
    stops = set(utils.stop_token_ids(tok, model))
    return [{"response": tok.decode([t for t in o.generated_tokens if t not in stops], skip_special_tokens=True).strip(),
             "tokens": len(o.generated_tokens)} for o in outs]


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------


def run_variant(variant: str, opts, model: Path, adapter: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--model", str(model), "--adapter", str(adapter),
           "--rows", str(opts.rows), "--new-tokens", str(opts.new_tokens), "--group", str(opts.group),
           "--prompts-per-step", str(opts.prompts_per_step)] + (["--profile"] if opts.profile else []) + (["--quick"] if opts.quick else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=opts.variant_timeout)
    except subprocess.TimeoutExpired as exc:
        print(f"[{variant}] stopped after {opts.variant_timeout} s", flush=True)
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        sys.stdout.write("".join(l + "\n" for l in out.splitlines() if l.startswith("[")))
        return {"variant": variant, "error": f"timed out after {opts.variant_timeout} s"}
    sys.stdout.write("".join(l + "\n" for l in proc.stdout.splitlines() if l.startswith("[")))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-2500:]
        print(f"[{variant}] failed:\n{tail}", file=sys.stderr, flush=True)
        return {"variant": variant, "error": tail[-600:]}
    return json.loads(lines[-1][7:])


def agreement(a: list[str], b: list[str]) -> float | None:
    if not a or not b or len(a) != len(b):
        return None
    return sum(x == y for x, y in zip(a, b)) / len(a)


def table(results: dict) -> str:
    def rate(r, task):
        t = r.get(task) or {}
        return f"{t['tokens_per_s']:,.0f}" if "tokens_per_s" in t else ("failed" if "error" in t else "-")

    lines = ["| variant | eval batch 8 tok/s | eval default tok/s (batch) | decode ms/step | GRPO 1 group tok/s "
             "| GRPO groups tok/s | chat first token ms | chat ms/token | peak GiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results["variants"].items():
        if "error" in r and "eval_default" not in r:
            lines.append(f"| {name} | failed | | | | | | | |")
            continue
        d = (r.get("eval_default") or {}).get("stats", {})
        chat = r.get("chat") or {}
        lines.append(f"| {name} | {rate(r, 'eval_batch8')} | {rate(r, 'eval_default')} ({d.get('batch_size', '-')}) "
                     f"| {d.get('decode_ms_per_step', '-')} | {rate(r, 'grpo_one_group')} | {rate(r, 'grpo_groups')} "
                     f"| {chat.get('first_token_ms', '-')} | {chat.get('ms_per_token', '-')} "
                     f"| {r.get('peak_reserved_gib', '-')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-3b")
    p.add_argument("--model-dir", default="/tmp/bench-generation-model")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--variant-timeout", type=int, default=900, help="seconds one variant may take")
    p.add_argument("--quick", action="store_true", help="only the default evaluation (and --profile)")
    p.add_argument("--profile", action="store_true", help="profile eager decode steps of the static engine")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--tag", default="generation")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--adapter", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.worker:
        print("RESULT " + json.dumps(worker(opts)), flush=True)
        return 0
    if opts.model:  # an existing model folder (with its adapter under adapter/), e.g. a tiny one for a dry run
        model, adapter = Path(opts.model), Path(opts.adapter or Path(opts.model) / "adapter")
    else:
        model, adapter = make_assets(opts.shape, Path(opts.model_dir))
    results: dict = {"shape": opts.shape, "rows": opts.rows, "new_tokens": opts.new_tokens, "group": opts.group,
                     "prompts_per_step": opts.prompts_per_step, "variants": {}}
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    for variant in opts.variants.split(","):
        results["variants"][variant] = run_variant(variant, opts, model, adapter)
        (out / f"{opts.tag}.json").write_text(json.dumps(results, indent=1))
    base = results["variants"].get("generate-unsloth", {})
    for name, r in results["variants"].items():
        for ref in ("generate-unsloth", "generate-hf"):
            if name != ref and ref in results["variants"]:
                r[f"greedy_rows_equal_{ref}"] = agreement(r.get("greedy_replies", []),
                                                          results["variants"][ref].get("greedy_replies", []))
    ratios = {}
    new = results["variants"].get("static", {})
    if base.get("eval_batch8") and new.get("eval_default"):
        ratios["eval_new_default_vs_old_default"] = new["eval_default"]["tokens_per_s"] / base["eval_batch8"]["tokens_per_s"]
    if base.get("grpo_one_group") and new.get("grpo_one_group"):
        ratios["grpo_one_group"] = new["grpo_one_group"]["tokens_per_s"] / base["grpo_one_group"]["tokens_per_s"]
    if base.get("grpo_one_group") and new.get("grpo_groups"):
        ratios["grpo_groups_vs_old_one_group"] = new["grpo_groups"]["tokens_per_s"] / base["grpo_one_group"]["tokens_per_s"]
    if base.get("chat") and new.get("chat"):
        ratios["chat_ms_per_token"] = base["chat"]["ms_per_token"] / new["chat"]["ms_per_token"]
    results["ratios_vs_generate_unsloth"] = {k: round(v, 2) for k, v in ratios.items()}
    (out / f"{opts.tag}.json").write_text(json.dumps(results, indent=1))
    (out / f"{opts.tag}.md").write_text(table(results) + "\n")
    print(table(results))
    for name, r in results["variants"].items():
        eq = {k: v for k, v in r.items() if k.startswith("greedy_rows_equal")}
        if eq:
            print(f"{name}: {eq}")
    print("ratios:", json.dumps(results["ratios_vs_generate_unsloth"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
