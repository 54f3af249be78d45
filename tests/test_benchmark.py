"""The benchmark's bookkeeping, on CPU: parameter counts, kernel categories, ratios and the report."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_train  # noqa: E402
import make_model  # noqa: E402


@pytest.mark.parametrize("shape", sorted(make_model.SHAPES))
def test_parameter_count_matches_a_built_model(shape):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=make_model.VOCAB, **make_model.SHAPES[shape])
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    assert make_model.parameter_count(shape) == sum(p.numel() for p in model.parameters())


def test_published_sizes():
    # Qwen2.5 model cards: 0.49B, 3.09B, 7.61B parameters.
    assert round(make_model.parameter_count("qwen2.5-0.5b") / 1e9, 2) == 0.49
    assert round(make_model.parameter_count("qwen2.5-3b") / 1e9, 2) == 3.09
    assert round(make_model.parameter_count("qwen2.5-7b") / 1e9, 2) == 7.61
    assert make_model.matmul_parameters("qwen2.5-7b") == make_model.parameter_count("qwen2.5-7b") - 151936 * 3584


@pytest.mark.parametrize("name,category", [
    ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*, float*)", "dequantise 4-bit"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("Memcpy DtoH (Device -> Pinned)", "host<->device copies (offload)"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda(at::Ten", "dtype casts and device copies"),
    ("triton_poi_fused__to_copy_add_mul_rsub_sigmoid_2", "triton (fused norm, rope, swiglu, lora)"),
    ("_cross_entropy_forward", "loss (lm head cross-entropy)"),
    ("_fl_backward_kernel", "loss (lm head cross-entropy)"),
    ("_backward_kernel", "loss (lm head cross-entropy)"),
    ("void kOptimizer32bit2State<__nv_bfloat16, 1>", "optimizer"),
    ("void kOptimizerStatic8bit2StateBlockwise<__nv_bfloat16, 2048, 8>", "optimizer"),
    ("_rms_layernorm_backward", "triton (fused norm, rope, swiglu, lora)"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "elementwise and reductions"),
    ("some_unknown_kernel_xyz", "other"),
])
def test_kernel_categories(name, category):
    assert bench_train.categorise_kernel(name) == category


def test_trace_analysis_adds_up(tmp_path):
    import gzip

    # three kernels on one stream and a copy overlapping the second: busy 0-30 and 40-100 us
    events = [{"cat": "kernel", "name": "kDequantizeBlockwise", "ts": 0, "dur": 30},
              {"cat": "kernel", "name": "nvjet_tst_x", "ts": 40, "dur": 50},
              {"cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)", "ts": 60, "dur": 40},
              {"cat": "kernel", "name": "nvjet_tst_x", "ts": 100, "dur": 0},
              {"cat": "gpu_user_annotation", "name": "Optimizer.step#AdamW.step", "ts": 0, "dur": 100},
              {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500}]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    got = bench_train.analyse_trace(str(path))
    assert got["span_ms"] == pytest.approx(0.1) and got["gpu_busy_ms"] == pytest.approx(0.09)
    assert got["gpu_idle_share"] == pytest.approx(0.1) and got["idle_gaps"] == 1
    assert got["launches"] == 4 and got["kernel_ms"] == pytest.approx(0.12)
    assert [c["category"] for c in got["categories"]] == ["matmul", "host<->device copies (offload)", "dequantise 4-bit"]
    assert got["top_kernels"][0] == {"name": "nvjet_tst_x", "ms": pytest.approx(0.05), "calls": 2, "category": "matmul"}
    (tmp_path / "empty.json").write_text(json.dumps({"traceEvents": events[-2:]}))
    with pytest.raises(ValueError, match="no GPU kernels"):
        bench_train.analyse_trace(str(tmp_path / "empty.json"))


def _run(tps, mem, losses=(2.0, 1.9)):
    return {"tokens_per_s": tps, "seconds": 10.0, "steps_measured": 5, "peak_allocated_gib": mem,
            "peak_reserved_gib": mem + 0.5, "losses": list(losses)}


def test_ratios_are_per_repeat_and_mfu_uses_the_measured_rate():
    results = {"shape": "qwen2.5-3b", "seq": 2048, "micro": 2, "accum": 4, "steps": 14, "warmup": 4,
               "flop_parameters": 3_000_000_000, "gpu": {"bf16_tflops": 600.0},
               "baseline_r1": _run(6000, 5.0), "suite_r1": _run(9000, 3.0),
               "baseline_r2": _run(5000, 5.0), "suite_r2": _run(8000, 2.9, (2.0, 1.95)),
               "suite_auto": _run(24000, 40.0)}
    bench_train.add_derived(results)
    pair = results["default_vs_baseline"]
    assert pair["speed_ratios"] == pytest.approx([1.5, 1.6])
    assert pair["speed_median"] == pytest.approx(1.55) and pair["speed_min"] == pytest.approx(1.5)
    assert pair["memory_ratios"] == pytest.approx([0.6, 0.58])
    assert results["suite_r1"]["mfu"] == pytest.approx(9000 * 4 * 3e9 / 600e12)
    assert results["suite_r1"]["seconds_per_step"] == pytest.approx(2.0)
    # single runs are compared with the median baseline (5,500 tok/s, 5.0 GiB)
    assert results["suite_auto"]["vs_baseline"] == pytest.approx(24000 / 5500)
    assert results["suite_auto"]["memory_vs_baseline"] == pytest.approx(8.0)
    assert results["suite_r2"]["max_rel_loss_diff_vs_suite"] == pytest.approx(0.05 / 1.9)
    table = bench_train.markdown_report(results)
    assert "| suite_r1 | 9,000 | 2.00 | 3.00 GiB | 3.50 GiB | 18.0% | 1.50x, 0.60x memory |" in table
    assert "speed 1.50x, 1.60x (median 1.55x)" in table


def test_report_without_baseline_or_with_a_failed_run():
    results = {"gpu": {"bf16_tflops": 700.0}, "flop_parameters": 1e9, "suite": _run(1000, 2.0),
               "baseline": {"error": "CUDA out of memory"}, "varlen_padded": _run(100, 2.0), "varlen_packed": _run(250, 2.0)}
    bench_train.add_derived(results)
    assert "default_vs_baseline" not in results and "vs_baseline" not in results["suite"]
    assert results["packing_vs_padding"] == pytest.approx(2.5)
    assert "packing 2.50x" in bench_train.markdown_report(results)


def test_packed_routes_and_plans_are_compared_within_the_run():
    results = {"varlen_padded": _run(2600, 3.0), "varlen_packed": _run(6500, 2.8, (2.0, 1.9)),
               "varlen_packed_per_document": _run(5000, 2.8, (2.0, 1.8)),
               "varlen_padded_auto": _run(7000, 44.0), "varlen_packed_auto": _run(17500, 41.0)}
    bench_train.add_derived(results)
    cmp = results["packed_varlen_vs_per_document"]
    assert cmp["speed"] == pytest.approx(1.3) and cmp["max_rel_loss_diff"] == pytest.approx(0.1 / 1.8)
    assert results["packing_vs_padding_auto"] == pytest.approx(2.5)
    report = bench_train.markdown_report(results)
    assert "one varlen call per layer against one SDPA call per document: 1.30x" in report
    assert "Under --auto-batch on both sides: packing 2.50x padding." in report


def test_environment_variant_is_compared_with_the_default_of_its_repeat():
    results = {"suite_r1": _run(10000, 3.0), "suite_env_r1": _run(12000, 3.0, (2.0, 1.9)),
               "suite_r2": _run(9000, 3.0), "suite_env_r2": _run(9900, 3.0), "variant_env": {"X": "1"}}
    bench_train.add_derived(results)
    assert results["variant_env_vs_default"]["speed_ratios"] == pytest.approx([1.2, 1.1])
    assert results["suite_env_r1"]["max_rel_loss_diff_vs_suite"] == 0.0
    assert "{'X': '1'} against without, per repeat: 1.20x, 1.10x." in bench_train.markdown_report(results)


def test_envpair_needs_a_variant_and_its_own_call(tmp_path):
    with pytest.raises(SystemExit, match="pass e.g. --variant-env"):
        bench_train.main(["--parts", "envpair", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="separate calls"):
        bench_train.main(["--parts", "fixed,envpair", "--variant-env", "X=1", "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []  # refused before building a model or writing results


@pytest.mark.slow
def test_suite_worker_is_train_lora_own_run(tmp_path, tiny_model):
    """The suite's numbers are the product's: its worker parses train_lora.py's flags and runs
    reasonforge.training's setup, train and finish (here on CPU, with the hf backend)."""
    import subprocess

    data = tmp_path / "rows.json"
    data.write_text(json.dumps(bench_train.fixed_rows(24, 64)))
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(bench_train.__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, bench_train.__file__, "--worker", "suite", "--model", str(tiny_model),
                           "--data", str(data), "--tmp", str(tmp_path / "w"), "--backend", "hf", "--optim", "adamw_torch",
                           "--steps", "4", "--warmup", "1", "--micro", "2", "--accum", "2", "--checkpointing", "off"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["steps_measured"] == 3 and result["tokens"] == 3 * 2 * 2 * 64 and result["tokens_per_s"] > 0
    assert len(result["losses"]) == 4 and result["packed_attention"] == "not packing" and result["plan"] is None
    run = tmp_path / "w" / "train_lora"
    config = json.loads((run / "training_config.json").read_text())
    assert config["arguments"]["graph_wrapper"] == "cpp" and config["arguments"]["run_name"] == "bench"
    assert config["chat_template"] == "given" and config["optim"] == "adamw_torch"
    metrics = json.loads((run / "training_metrics.json").read_text())
    assert [h["loss"] for h in metrics["history"] if "loss" in h] == result["losses"]
    assert (run / "final_model" / "adapter_model.safetensors").is_file()
    assert "Parameters:" in proc.stdout and "Steps: 4," in proc.stdout  # the script's banner and summary


def test_coldstart_part_is_bench_coldstart(monkeypatch):
    import bench_coldstart

    seen = []
    monkeypatch.setattr(bench_coldstart, "main", lambda argv: seen.append(argv) or 0)
    assert bench_train.main(["--parts", "coldstart", "--steps", "30", "--out", "/tmp/o", "--model-dir", "/m"]) == 0
    assert seen == [["--shape", "qwen2.5-3b", "--steps", "30", "--out", "/tmp/o", "--model-dir", "/m"]]
    with pytest.raises(SystemExit, match="coldstart runs fresh processes"):
        bench_train.main(["--parts", "coldstart,fixed"])
