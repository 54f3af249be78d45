"""Time to first step for short runs and resumes: each variant in a fresh process, pinned to 4 cores.

    python benchmarks/bench_coldstart.py --shape qwen2.5-3b --steps 30 --out benchmarks/results

A g5.xlarge has 4 vCPUs, and what happens before the first optimizer step (imports, loading and
quantising the model, tokenising, Dynamo tracing, Inductor and Triton compiles, the C++ wrapper's
g++ build) is CPU work, so every process runs under `taskset -c 0-3`. Variants, in this order:

- baseline: plain QLoRA (transformers + bitsandbytes + PEFT + TRL), nothing compiled;
- stock-cold, stock-warm: Unsloth's notebook recipe (FastLanguageModel, get_peft_model, SFTTrainer);
- suite-cold, suite-warm: `train_lora.py` as a user runs it (CUDA graphs and Python launchers, auto);
- nographs-cold, nographs-warm: `train_lora.py --cuda-graphs off` (Python launchers under 150 steps);
- cpp-cold, cpp-warm: `train_lora.py --cuda-graphs off --graph-wrapper cpp`, the C++ launchers forced;
- recompute-warm: `train_lora.py --gradient-checkpointing unsloth`, every layer recomputed in backward
  as in stock Unsloth (the default keeps as many layers' activations as memory allows), on the
  suite's caches; only partly warm: a suite run that kept every layer compiled no no-grad block
  graphs, which the recompute needs;
- varied, varied-nographs (only when named): the suite with and without graphs on rows of 150 to
  about 2,000 tokens, where batches come in several padded lengths (on the suite's warm caches).

`cold` starts with empty compile caches (Inductor's FX graph and AOTAutograd caches, Triton's
kernels, Unsloth's generated modules and mega-cache, each given its own folder); `warm` is a second
process on the same folders, as a resume on the same machine. Every variant trains on the same
token rows (sequence about 2,000 tokens, micro-batch 2 x 4, LoRA r 16 on the seven projections).
Reported per variant: time from launch to the end of the first optimizer step, wall time to the end
of the last step, steady tokens/s (steps after the second), peak reserved GPU memory, and the
suite's per-step losses with and without graphs and wrappers (none may change the loss curve).
Ratios are against stock-cold.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

MICRO, ACCUM, SEQ = 2, 4, 2048
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue side "
         "kind head house service friend father power hour game line end member law car city community name").split()


def prepare_data(tmp: Path, rows: int, varied: bool = False) -> Path:
    """A data_preparation.py folder of conversations just under SEQ tokens (`varied`: 20-300 word
    questions and 100-1,600 word answers)."""
    import data_preparation

    rng = random.Random(0)
    name = "prepared-varied" if varied else "prepared"
    src = tmp / f"{name}.jsonl"
    with open(src, "w") as fh:
        for i in range(rows):
            q = f"Item {i}: " + " ".join(rng.choice(WORDS) for _ in range(300 if not varied else rng.randint(20, 300)))
            a = " ".join(rng.choice(WORDS) for _ in range(1600 if not varied else rng.randint(100, 1600)))
            fh.write(json.dumps({"question": q, "answer": a}) + "\n")
    out = tmp / name
    assert data_preparation.main(["--dataset", str(src), "--skip-upload", "--output-dir", str(out),
                                  "--val-size", "0.03"]) == 0
    return out


def token_rows(model: str, prepared: Path) -> Path:
    """The prepared train rows as input_ids/labels, rendered and masked as train_lora.py does."""
    from transformers import AutoTokenizer

    import utils

    tok = AutoTokenizer.from_pretrained(model)
    dd, _ = utils.load_prepared_dataset(prepared)
    rows = [utils.encode_conversation(m, tok) for m in dd["train"]["messages"]]
    path = prepared.parent / "token_rows.json"
    path.write_text(json.dumps([{k: v[:SEQ] for k, v in r.items()} for r in rows]))
    return path


def clock_callback(store: dict):
    """First-step and last-step end times (epoch seconds) and the steady rate after the second step."""
    import torch
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            store["train_begin"] = time.time()

        def on_step_begin(self, args, state, control, **kw):
            store["begin"] = time.time()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            now = time.time()
            store.setdefault("first_step_end_at", now)
            store["last_step_end_at"] = now
            if state.global_step > 2:
                store["seconds"] = store.get("seconds", 0.0) + now - store["begin"]
                store["tokens"] = store.get("tokens", 0) + state.num_input_tokens_seen - store["tokens_before"]
            store["tokens_before"] = state.num_input_tokens_seen

    return Clock()


def sft_config(out: str, steps: int):
    from trl import SFTConfig

    return SFTConfig(output_dir=out, per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM,
                     max_steps=steps, learning_rate=2e-4, optim="adamw_8bit", bf16=True, logging_steps=1,
                     save_strategy="no", report_to=[], max_length=SEQ, seed=0, remove_unused_columns=False,
                     include_num_input_tokens_seen="non_padding", dataset_kwargs={"skip_prepare_dataset": True},
                     disable_tqdm=True)


def worker_stock(opts) -> dict:
    from unsloth import FastLanguageModel  # first, as Unsloth's notebooks do

    import datasets
    from trl import SFTTrainer

    from reasonforge.report import Phases

    phases = Phases()  # the same spans as train_lora.py's setup_phases_s, where the recipe has them
    phases.mark("imports")
    model, tok = FastLanguageModel.from_pretrained(opts.model, max_seq_length=SEQ, load_in_4bit=True)
    phases.mark("model load")
    rows = datasets.Dataset.from_list(json.loads(Path(opts.rows).read_text()))
    phases.mark("tokenise")
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, target_modules=TARGETS,
                                             use_gradient_checkpointing="unsloth", random_state=0, max_seq_length=SEQ)
    phases.mark("LoRA attach")
    return _train(SFTTrainer, model, tok, rows, opts, phases=phases)


def worker_baseline(opts) -> dict:
    import datasets
    from trl import SFTTrainer

    from bench_train import qlora_baseline

    model, tok = qlora_baseline(opts.model)
    return _train(SFTTrainer, model, tok, datasets.Dataset.from_list(json.loads(Path(opts.rows).read_text())), opts,
                  gradient_checkpointing=True)


def _train(trainer_class, model, tok, rows, opts, gradient_checkpointing=False, phases=None) -> dict:
    import torch

    store: dict = {}
    cfg = sft_config(opts.tmp, opts.steps)
    if gradient_checkpointing:
        cfg.gradient_checkpointing, cfg.gradient_checkpointing_kwargs = True, {"use_reentrant": False}
    trainer = trainer_class(model=model, args=cfg, train_dataset=rows, processing_class=tok,
                            callbacks=[clock_callback(store)])
    if phases is not None:
        phases.mark("trainer build")
    trainer.train()
    return {"first_step_end_at": store["first_step_end_at"], "last_step_end_at": store["last_step_end_at"],
            "steady_tokens_per_s": store["tokens"] / store["seconds"],
            "first_step_s": store["first_step_end_at"] - store["train_begin"],
            "setup_phases_s": phases.spans(until=store["train_begin"]) if phases is not None else None,
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),  # as train_lora.py reports it
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


WORKERS = {"stock": worker_stock, "baseline": worker_baseline}


def pinned(cmd: list[str]) -> list[str]:
    return (["taskset", "-c", "0-3"] + cmd) if shutil.which("taskset") and (os.cpu_count() or 1) > 4 else cmd


def launch(cmd: list[str], cwd: Path, caches: Path, log: Path) -> tuple[float, int]:
    """Run one variant; returns (launch time, exit code). Its compile caches all live under `caches`."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"), "TRITON_CACHE_DIR": str(caches / "triton"),
           "UNSLOTH_MEGA_CACHE_DIR": str(caches / "unsloth_mega"),
           "UNSLOTH_COMPILE_LOCATION": str(caches / "unsloth_compiled"), "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}",
           "UNSLOTH_DISABLE_STATISTICS": "1"}
    cwd.mkdir(parents=True, exist_ok=True)  # Unsloth writes its generated modules under the working folder
    t0 = time.time()
    with open(log, "w") as fh:
        code = subprocess.run(pinned(cmd), cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    return t0, code


def run_variant(name: str, family: str, cmd: list[str], tmp: Path, out: Path, result_of) -> dict:
    log = out / f"coldstart_{name}.log"
    t0, code = launch(cmd, tmp / f"cwd-{family}", tmp / f"caches-{family}", log)
    if code != 0:
        print(f"[{name}] exit {code}; see {log}", flush=True)
        return {"error": f"exit {code}"}
    r = result_of()
    r.update(time_to_first_step_s=r["first_step_end_at"] - t0, wall_to_last_step_s=r["last_step_end_at"] - t0)
    print(f"[{name}] first step after {r['time_to_first_step_s']:.1f} s, last after {r['wall_to_last_step_s']:.1f} s, "
          f"{r['steady_tokens_per_s']:,.0f} tokens/s steady", flush=True)
    return r


def orchestrate(opts) -> int:
    import make_model

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(opts.work) if opts.work else Path(tempfile.mkdtemp(prefix="coldstart-"))
    tmp.mkdir(parents=True, exist_ok=True)
    model = Path(opts.model_dir or tmp / opts.shape)
    if not (model / "config.json").exists():
        make_model.build(opts.shape, model)
    prepared, rows = tmp / "prepared", tmp / "token_rows.json"
    if not rows.exists():  # a --work folder from an earlier call keeps its data, model and caches
        prepared = prepare_data(tmp, (opts.steps + 2) * MICRO * ACCUM + 12)
        rows = token_rows(str(model), prepared)
    results: dict = {"shape": opts.shape, "steps": opts.steps, "micro": MICRO, "accum": ACCUM, "cores": "0-3", "runs": {}}

    def worker(kind):
        res = tmp / f"{kind}.json"
        cmd = [sys.executable, __file__, "--worker", kind, "--model", str(model), "--rows", str(rows),
               "--steps", str(opts.steps), "--tmp", str(tmp / f"out-{kind}"), "--result", str(res)]
        return cmd, lambda: json.loads(res.read_text())

    def suite(extra, run_dir, data=prepared):
        cmd = [sys.executable, str(ROOT / "train_lora.py"), "--model-name", str(model), "--dataset-path", str(data),
               "--output-dir", str(run_dir), "--backend", "unsloth", "--max-steps", str(opts.steps), "--batch-size",
               str(MICRO), "--gradient-accumulation-steps", str(ACCUM), "--save-steps", "100000", "--optim",
               "adamw_8bit", "--seed", "0", "--skip-s3-upload", *extra]

        def result():
            m = json.loads((run_dir / "training_metrics.json").read_text())
            cfg = json.loads((run_dir / "training_config.json").read_text())
            return {k: m.get(k) for k in ("first_step_end_at", "last_step_end_at", "steady_tokens_per_s",
                                          "setup_s", "first_step_s", "setup_phases_s", "peak_gpu_memory_gib")} | {
                "losses": [h["loss"] for h in m["history"] if "loss" in h],
                "tokens_per_step": m["tokens_seen"] / max(m["global_step"], 1),
                "compiled_graphs": cfg.get("compiler"), "kept_layers": cfg.get("kept_layers")}
        return cmd, result

    plan = [("baseline", "baseline", worker("baseline")), ("stock-cold", "stock", worker("stock")),
            ("stock-warm", "stock", worker("stock"))]
    for label, extra in (("suite", []), ("nographs", ["--cuda-graphs", "off"]),
                         ("cpp", ["--cuda-graphs", "off", "--graph-wrapper", "cpp"])):
        for phase in ("cold", "warm"):
            plan.append((f"{label}-{phase}", label, suite(extra, tmp / f"run-{label}-{phase}")))
    plan.append(("recompute-warm", "suite", suite(["--gradient-checkpointing", "unsloth"], tmp / "run-recompute-warm")))
    only = set(opts.variants.split(",")) if opts.variants else None
    if only and only & {"varied", "varied-nographs"}:  # rows of widely varied length: many batch shapes
        varied = tmp / "prepared-varied"
        if not varied.exists():
            varied = prepare_data(tmp, (opts.steps + 2) * MICRO * ACCUM + 12, varied=True)
        plan += [("varied", "suite", suite([], tmp / "run-varied", varied)),
                 ("varied-nographs", "nographs", suite(["--cuda-graphs", "off"], tmp / "run-varied-nographs", varied))]
    for name, family, (cmd, result_of) in plan:
        if only and name not in only:
            continue
        results["runs"][name] = run_variant(name, family, cmd, tmp, out, result_of)
        (out / f"coldstart_{opts.shape}.json").write_text(json.dumps(results, indent=2))
    report = markdown(results)
    (out / f"coldstart_{opts.shape}.md").write_text(report)
    print(report)
    return 0


def markdown(results: dict) -> str:
    runs = {k: v for k, v in results["runs"].items() if "error" not in v}
    ref = runs.get("stock-cold")
    lines = [f"Shape {results['shape']}, {results['steps']} optimizer steps of {results['micro']} x {results['accum']} "
             f"rows of about 2,000 tokens, each variant a fresh process on cores {results['cores']}.", "",
             "| variant | first step after | vs stock-cold | last step after | steady tokens/s | vs stock-cold | peak GiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in runs.items():
        d = f"{r['time_to_first_step_s'] - ref['time_to_first_step_s']:+.1f} s" if ref else ""
        x = f"{r['steady_tokens_per_s'] / ref['steady_tokens_per_s']:.2f}x" if ref else ""
        peak = f"{r['peak_gpu_memory_gib']:.2f}" if r.get("peak_gpu_memory_gib") else ""
        lines.append(f"| {name} | {r['time_to_first_step_s']:.1f} s | {d} | {r['wall_to_last_step_s']:.1f} s | "
                     f"{r['steady_tokens_per_s']:,.0f} | {x} | {peak} |")
    lines += phase_table(runs)
    for name, r in runs.items():
        keep = r.get("kept_layers")
        if keep:
            predicted = f"predicted peak {keep['predicted_peak_gib']} GiB; " if keep.get("predicted_peak_gib") else ""
            lines += ["", f"{name}: {keep['kept']} of {keep['layers']} decoder layers kept out of checkpointing "
                      f"({predicted}{keep['reason']})."]
    pairs = [(f"{other}-{phase}", f"suite-{phase}", f"{what} ({phase})")
             for other, what in (("nographs", "CUDA graphs against none"), ("cpp", "CUDA graphs against the C++ wrapper"))
             for phase in ("cold", "warm")]
    # recompute runs on the suite's caches, so it has a warm run only; caches do not change the losses.
    pairs += [("recompute-warm", f"suite-{phase}", f"layers kept ({phase}) against every layer recomputed (warm)")
              for phase in ("cold", "warm")]
    # the caches only skip compiles, so a warm run must train as the cold one did
    pairs += [("suite-warm", "suite-cold", "warm caches against cold"),
              ("stock-cold", "suite-cold", "stock Unsloth against the suite (cold; no warmup against the suite's 5 steps)")]
    for other, suite, what in pairs:
        a, b = runs.get(suite, {}).get("losses"), runs.get(other, {}).get("losses")
        if a and b and len(a) == len(b):
            worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
            lines += ["", f"Per-step losses, {what}: largest relative difference {worst:.1e}."]
    for phase in ("cold", "warm"):
        py, cpp = runs.get(f"nographs-{phase}"), runs.get(f"cpp-{phase}")
        if not (py and cpp and cpp["steady_tokens_per_s"] > py["steady_tokens_per_s"] and py.get("tokens_per_step")):
            continue
        extra = cpp["time_to_first_step_s"] - py["time_to_first_step_s"]
        saving = py["tokens_per_step"] * (1 / py["steady_tokens_per_s"] - 1 / cpp["steady_tokens_per_s"])
        lines += ["", f"C++ against Python wrapper, {phase}: first step {extra:+.1f} s, "
                  f"{cpp['steady_tokens_per_s'] / py['steady_tokens_per_s']:.2f}x the steady tokens/s, "
                  f"{saving:.3f} s saved a step: it repays its build after {max(extra, 0) / saving:.0f} steps."]
    return "\n".join(lines) + "\n"


def phase_table(runs: dict) -> list[str]:
    """Where each variant's time before its first step went, span by span, in seconds."""
    timed = {name: r for name, r in runs.items() if r.get("setup_phases_s")}
    if not timed:
        return []
    names = list(dict.fromkeys(p for r in timed.values() for p in r["setup_phases_s"]))
    lines = ["", "Seconds from launch to the end of the first step, by part (a dash: no such part in that recipe):", "",
             "| part | " + " | ".join(timed) + " |", "| --- |" + " ---: |" * len(timed)]
    for part in [*names, "first step"]:
        cells = [r["setup_phases_s"].get(part) if part != "first step" else r.get("first_step_s") for r in timed.values()]
        lines.append(f"| {part} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-3b")
    p.add_argument("--model-dir", default=None, help="reuse a model folder (default: build one under /tmp)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per variant (default: %(default)s)")
    p.add_argument("--variants", default="", help="comma list to run only some (default: all, in order)")
    p.add_argument("--work", default=None, help="folder for the model, data and caches, kept between calls "
                   "(default: a new temporary one); a warm variant needs its cold one run there first")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--worker", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--rows", default=None)
    p.add_argument("--tmp", default=None)
    p.add_argument("--result", default=None)
    opts = p.parse_args(argv)
    if opts.worker:
        Path(opts.result).write_text(json.dumps(WORKERS[opts.worker](opts)))
        return 0
    return orchestrate(opts)


if __name__ == "__main__":
    sys.exit(main())
