"""Training and inference speed of the suite against a plain QLoRA baseline, on one GPU.

    python benchmarks/bench_train.py --shape qwen2.5-3b --parts fixed,autobatch,varlen,inference \
        --out benchmarks/results

Each variant runs in its own process on identical data and settings (sequence length 2048,
micro-batch 2, gradient accumulation 4, LoRA r 16 on the seven projections, adamw_8bit):

- baseline: transformers + bitsandbytes NF4 (double quantisation, bf16 compute) + PEFT + SDPA
  + gradient checkpointing + TRL SFTTrainer, written out here on purpose;
- suite: train_lora.py's own run, its flags parsed and validated by the script and then
  reasonforge.training's setup, train and finish, on this file's rows (--graph-wrapper cpp, the
  choice of long runs);
- suite-auto: the same with --auto-batch.

`--parts coldstart` times a short run instead, from launch to the first step, cold and warm, against
stock Unsloth (benchmarks/bench_coldstart.py, called with --shape, --model-dir, --steps and --out).
`--parts profile` traces one optimizer step of each with torch.profiler and reports where the
GPU time goes and how long the GPU sat idle (`profilepacked`: one packed step of the suite);
`varlen` and `packplan` time padded against packed rows of variable length; see
benchmarks/RESULTS.md for every part.

After warm-up steps it reports tokens/s, seconds per optimizer step, peak GPU memory, an MFU
estimate (4 x parameters FLOPs per token for a forward plus input-gradient pass, over the bf16
matmul rate measured on this GPU) and ratios against the baseline, as markdown and JSON.
Weights are random (make_model.py): speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_workers import ACCUM, MICRO, SEQ, WORKERS, fixed_rows, varlen_rows  # noqa: E402

# bench_coldstart.py, probe_packed_attention.py and the tests import these from bench_train.
from bench_workers import analyse_trace, categorise_kernel, chat_length, qlora_baseline  # noqa: E402,F401


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------


_RESULTS_FILE: Path | None = None
_RESULTS: dict = {}


def run_worker(name: str, env: dict | None = None, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", name] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"[{name}] failed:\n{tail}", file=sys.stderr)
        return {"error": tail[-500:]}
    result = json.loads(lines[-1][7:])
    _RESULTS.setdefault("runs", []).append({"worker": name, "env": env or {}, **{k: str(v) for k, v in kw.items()},
                                            **result})
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
    p.add_argument("--parts", default="fixed",
                   help="comma list of profile, profilepacked, fixed, envpair, auto80, auto24, autobatch, varlen, packplan, "
                        "inference; or coldstart alone")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per variant (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="steps not timed (default: %(default)s)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--repeats", type=int, default=1, help="alternated baseline/suite pairs in `fixed`")
    p.add_argument("--trace", action="store_true", help="with `profile`: also write Chrome traces to --out")
    p.add_argument("--variant-env", default="", help="for `envpair`: environment settings (KEY=VALUE,...) to time "
                   "the suite default under, e.g. TORCHINDUCTOR_CPP_WRAPPER=1")
    p.add_argument("--grid", action="store_true", help="also time fixed micro-batch / checkpointing combinations")
    # worker-only options
    p.add_argument("--worker", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--tmp", default=None)
    p.add_argument("--micro", type=int, default=MICRO)
    p.add_argument("--accum", type=int, default=ACCUM)
    p.add_argument("--checkpointing", default="unsloth")
    p.add_argument("--backend", default="unsloth", help="suite worker: hf checks the wiring on a CPU")
    p.add_argument("--optim", default="adamw_8bit")
    p.add_argument("--packing", type=int, default=0)
    p.add_argument("--profile", type=int, default=0)
    p.add_argument("--trace-file", default="")
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

    parts = set(opts.parts.split(","))
    if "coldstart" in parts:
        if parts != {"coldstart"}:
            sys.exit("error: --parts coldstart runs fresh processes of its own (bench_coldstart.py); run it in a call "
                     "of its own")
        import bench_coldstart

        return bench_coldstart.main(["--shape", opts.shape, "--steps", str(opts.steps), "--out", opts.out,
                                     *(["--model-dir", opts.model_dir] if opts.model_dir else [])])
    if "envpair" in parts and not opts.variant_env:
        sys.exit("error: --parts envpair compares the default with and without --variant-env; pass e.g. "
                 "--variant-env TORCHINDUCTOR_CPP_WRAPPER=0")
    if {"envpair", "fixed"} <= parts:
        sys.exit("error: envpair and fixed both time the default under the same names; run them in separate calls")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    model_dir = Path(opts.model_dir or tmp / opts.shape)
    if not (model_dir / "config.json").exists():
        make_model.build(opts.shape, model_dir)
    results: dict = {"shape": opts.shape, "flop_parameters": make_model.matmul_parameters(opts.shape), "seq": SEQ,
                     "micro": MICRO, "accum": ACCUM, "steps": opts.steps, "warmup": opts.warmup}
    global _RESULTS_FILE
    _RESULTS_FILE = out / f"bench_{opts.shape}_runs.json"
    results["gpu"] = run_worker("matmul")
    if "inference" in opts.parts:
        results["inference"] = run_worker("inference", model=model_dir, prompts=opts.prompts, new_tokens=opts.new_tokens)
    rows_needed = (opts.steps + 1) * MICRO * ACCUM * 4
    common = dict(model=model_dir, tmp=tmp / "run", warmup=opts.warmup, steps=opts.steps)
    data = tmp / "fixed.json"
    data.write_text(json.dumps(fixed_rows(rows_needed, SEQ)))
    vdata = tmp / "varlen.json"  # the same variable-length rows for every part that packs or pads
    if parts & {"profilepacked", "varlen", "packplan"}:
        vdata.write_text(json.dumps(varlen_rows(rows_needed * 4, SEQ)))
    if "profile" in parts:
        for name, kw in (("baseline", {}), ("suite", {"checkpointing": "unsloth"})):
            trace = out / f"trace_{opts.shape}_{name}.json.gz" if opts.trace else tmp / f"trace_{name}.json.gz"
            got = run_worker(name, data=data, profile=1, trace_file=trace, **kw, **common)
            results[f"profile_{name}"] = got.get("profile", got)
    if "profilepacked" in parts:  # one packed step on variable-length rows
        trace = out / f"trace_{opts.shape}_suite_packed.json.gz" if opts.trace else tmp / "trace_suite_packed.json.gz"
        got = run_worker("suite", data=vdata, packing=1, profile=1, trace_file=trace, **common)
        results["profile_suite_packed"] = got.get("profile", got)
    if "envpair" in opts.parts:  # the suite default with and without --variant-env, alternated
        env = dict(item.split("=", 1) for item in opts.variant_env.split(",") if item)
        results["variant_env"] = env
        for i in range(opts.repeats):
            results[f"suite_r{i + 1}"] = run_worker("suite", data=data, checkpointing="unsloth", **common)
            results[f"suite_env_r{i + 1}"] = run_worker("suite", env=env, data=data, checkpointing="unsloth", **common)
    if "fixed" in opts.parts:
        for i in range(opts.repeats):  # alternated, so drift in clocks or neighbours hits both sides
            suffix = f"_r{i + 1}" if opts.repeats > 1 else ""
            results["baseline" + suffix] = run_worker("baseline", data=data, **common)
            results["suite" + suffix] = run_worker("suite", data=data, checkpointing="unsloth", **common)
        if opts.grid:
            for micro, ckpt in [(8, "off"), (4, "off"), (8, "unsloth")]:
                results[f"suite_mb{micro}_{ckpt}"] = run_worker("suite", data=data, micro=micro,
                                                                accum=MICRO * ACCUM // micro, checkpointing=ckpt, **common)
    if "auto" in opts.parts:  # auto80, auto24, or both through "autobatch"
        if "auto80" in opts.parts or "autobatch" in opts.parts:
            results["suite_auto"] = run_worker("suite", data=data, auto_batch=1, **common)
        if "auto24" in opts.parts or "autobatch" in opts.parts:
            results["suite_auto_24gib"] = run_worker("suite", data=data, auto_batch=1, gpu_memory_gib=24, **common)
    if "varlen" in parts:
        results["varlen_padded"] = run_worker("suite", data=vdata, packing=0, **common)
        results["varlen_packed"] = run_worker("suite", data=vdata, packing=1, **common)
        # Unsloth's own route under torch < 2.12: one SDPA call per run of equal-length documents
        results["varlen_packed_per_document"] = run_worker("suite", env={"UNSLOTH_TORCH_VARLEN": "0"}, data=vdata,
                                                           packing=1, **common)
    if "packplan" in parts:  # padded against packed again, both under --auto-batch's plan
        results["varlen_padded_auto"] = run_worker("suite", data=vdata, packing=0, auto_batch=1, **common)
        results["varlen_packed_auto"] = run_worker("suite", data=vdata, packing=1, auto_batch=1, **common)
        results["varlen_packed_auto_24gib"] = run_worker("suite", data=vdata, packing=1, auto_batch=1,
                                                         gpu_memory_gib=24, **common)
    add_derived(results)
    (out / f"bench_{opts.shape}.json").write_text(json.dumps(results, indent=2))
    table = markdown_report(results)
    (out / f"bench_{opts.shape}.md").write_text(table)
    print(table)
    return 0


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _pairs(results: dict) -> list[tuple[str, str]]:
    """(baseline key, suite key) of each alternated repeat, or the single pair."""
    keys = sorted(k for k in results if k.startswith("baseline"))
    return [(k, "suite" + k[len("baseline"):]) for k in keys if "suite" + k[len("baseline"):] in results]


def add_derived(results: dict) -> None:
    """MFU for every timed run, ratios against the baseline of the same repeat, loss parity."""
    rate = results.get("gpu", {}).get("bf16_tflops")
    flop_params = results.get("flop_parameters")
    for value in results.values():
        if isinstance(value, dict) and "tokens_per_s" in value and rate and flop_params:
            value["mfu"] = value["tokens_per_s"] * 4 * flop_params / (rate * 1e12)
            value["seconds_per_step"] = value["seconds"] / max(1, value["steps_measured"])
    pairs = [(results[b], results[s]) for b, s in _pairs(results)
             if "tokens_per_s" in results[b] and "tokens_per_s" in results[s]]
    if pairs:
        speed = [s["tokens_per_s"] / b["tokens_per_s"] for b, s in pairs]
        memory = [s["peak_allocated_gib"] / b["peak_allocated_gib"] for b, s in pairs]
        results["default_vs_baseline"] = {"speed_ratios": speed, "memory_ratios": memory,
                                          "speed_median": statistics.median(speed), "speed_min": min(speed),
                                          "memory_max": max(memory)}
    for b, s in pairs:
        s["vs_baseline"], s["memory_vs_baseline"] = (s["tokens_per_s"] / b["tokens_per_s"],
                                                     s["peak_allocated_gib"] / b["peak_allocated_gib"])
    # runs without a baseline of their own are compared with the median baseline
    base = statistics.median([b["tokens_per_s"] for b, _ in pairs]) if pairs else None
    base_mem = statistics.median([b["peak_allocated_gib"] for b, _ in pairs]) if pairs else None
    for key, value in results.items():
        if (isinstance(value, dict) and "tokens_per_s" in value and base and "vs_baseline" not in value
                and not key.startswith(("baseline", "varlen"))):
            value["vs_baseline"] = value["tokens_per_s"] / base
            value["memory_vs_baseline"] = value["peak_allocated_gib"] / base_mem
    ref = results.get("suite", results.get("suite_r1", {})).get("losses", [])
    for key, value in results.items():
        got = value.get("losses", []) if isinstance(value, dict) and key != "suite" else []
        if ref and got and key.startswith(("suite", "baseline")):
            value["max_rel_loss_diff_vs_suite"] = max(abs(a - b) / abs(a) for a, b in zip(ref, got))
    env_pairs = [(results[k], results["suite_env" + k[5:]]) for k in sorted(results)
                 if k.startswith("suite_r") and "tokens_per_s" in results[k]
                 and "tokens_per_s" in results.get("suite_env" + k[5:], {})]
    if env_pairs:
        speed = [e["tokens_per_s"] / d["tokens_per_s"] for d, e in env_pairs]
        results["variant_env_vs_default"] = {"speed_ratios": speed, "speed_median": statistics.median(speed)}
    if "tokens_per_s" in results.get("varlen_padded", {}) and "tokens_per_s" in results.get("varlen_packed", {}):
        results["packing_vs_padding"] = results["varlen_packed"]["tokens_per_s"] / results["varlen_padded"]["tokens_per_s"]
    if "tokens_per_s" in results.get("varlen_padded_auto", {}) and "tokens_per_s" in results.get("varlen_packed_auto", {}):
        results["packing_vs_padding_auto"] = (results["varlen_packed_auto"]["tokens_per_s"]
                                              / results["varlen_padded_auto"]["tokens_per_s"])
    per_doc, packed = results.get("varlen_packed_per_document", {}), results.get("varlen_packed", {})
    if "tokens_per_s" in per_doc and "tokens_per_s" in packed:
        results["packed_varlen_vs_per_document"] = {
            "speed": packed["tokens_per_s"] / per_doc["tokens_per_s"],
            "max_rel_loss_diff": max(abs(a - b) / abs(a) for a, b in zip(per_doc["losses"], packed["losses"]))}


def markdown_report(results: dict) -> str:
    lines = [f"Shape {results.get('shape')}, sequence {results.get('seq')}, micro-batch {results.get('micro')} x "
             f"accumulation {results.get('accum')}, {results.get('warmup')} warm-up then "
             f"{results.get('steps', 0) - results.get('warmup', 0)} timed optimizer steps; bf16 matmul rate "
             f"{results.get('gpu', {}).get('bf16_tflops', 0):.0f} TFLOP/s.", "",
             "| run | tokens/s | s / step | peak allocated | peak reserved | MFU | vs baseline |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for key, v in results.items():
        if not (isinstance(v, dict) and "tokens_per_s" in v):
            continue
        vs = f"{v['vs_baseline']:.2f}x, {v['memory_vs_baseline']:.2f}x memory" if "vs_baseline" in v else ""
        lines.append(f"| {key} | {v['tokens_per_s']:,.0f} | {v.get('seconds_per_step', 0):.2f} | "
                     f"{v['peak_allocated_gib']:.2f} GiB | {v['peak_reserved_gib']:.2f} GiB | {v.get('mfu', 0):.1%} | {vs} |")
    pair = results.get("default_vs_baseline")
    if pair:
        lines += ["", "Suite default against the baseline of the same repeat: speed "
                  + ", ".join(f"{r:.2f}x" for r in pair["speed_ratios"]) + f" (median {pair['speed_median']:.2f}x); "
                  "peak allocated memory " + ", ".join(f"{r:.2f}x" for r in pair["memory_ratios"]) + "."]
    if "variant_env_vs_default" in results:
        lines += ["", f"Suite default under {results.get('variant_env')} against without, per repeat: "
                  + ", ".join(f"{r:.2f}x" for r in results["variant_env_vs_default"]["speed_ratios"]) + "."]
    if "packing_vs_padding" in results:
        lines += ["", f"Variable length: packing {results['packing_vs_padding']:.2f}x the effective tokens/s of padding."]
    if "packing_vs_padding_auto" in results:
        lines += ["", f"Under --auto-batch on both sides: packing {results['packing_vs_padding_auto']:.2f}x padding."]
    if "packed_varlen_vs_per_document" in results:
        cmp = results["packed_varlen_vs_per_document"]
        lines += ["", f"Packed rows, one varlen call per layer against one SDPA call per document: {cmp['speed']:.2f}x; "
                  f"per-step losses within {cmp['max_rel_loss_diff']:.1e} relative."]
    inf = results.get("inference", {})
    if "batched_speedup" in inf:
        lines += ["", f"Inference: batched {inf['batched']['tokens_per_s']:.1f} tokens/s against one at a time "
                  f"{inf['one_at_a_time']['tokens_per_s']:.1f} ({inf['batched_speedup']:.1f}x); perplexity pass "
                  f"{inf['perplexity']['input_tokens_per_s']:,.0f} input tokens/s."]
    for key in ("profile_baseline", "profile_suite", "profile_suite_packed"):
        prof = results.get(key)
        if not prof or "categories" not in prof:
            continue
        lines += ["", f"Where one traced optimizer step's GPU time goes ({key[8:]}): {prof['span_ms']:,.0f} ms from "
                  f"first to last kernel, GPU busy {prof['gpu_busy_ms']:,.0f} ms ({1 - prof['gpu_idle_share']:.0%}), "
                  f"{prof['launches']:,} kernels and copies; the profiler itself slows the CPU side.", "",
                  "| category | ms | share of kernel time |", "| --- | ---: | ---: |"]
        lines += [f"| {c['category']} | {c['ms']:,.1f} | {c['share_of_kernel_time']:.1%} |" for c in prof["categories"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
