"""train_lora.py on CPU with a tiny random Qwen model and the real Qwen tokenizer."""

import json
import math
from pathlib import Path

import pytest

import data_preparation as dp
import train_lora
from reasonforge import acceleration, callbacks, checkpoints, outputs, sft, training
import utils


def config(*argv) -> training.TrainConfig:
    return training.TrainConfig.from_args(train_lora.build_parser().parse_args(list(argv)))


def train(tmp_path, model, data, *extra, out="run"):
    target = tmp_path / out
    argv = ["--model-name", str(model), "--dataset-path", str(data), "--output-dir", str(target),
            "--batch-size", "4", "--gradient-accumulation-steps", "1", "--learning-rate", "5e-3",
            "--save-steps", "4", "--eval-steps", "4", "--warmup-steps", "0", *extra]
    return train_lora.main(argv), target


@pytest.fixture(scope="module")
def repeated_dataset(tmp_path_factory):
    """Eight short conversations; training several epochs on them must drive the loss down."""
    root = tmp_path_factory.mktemp("repeated")
    rows = [{"question": f"What is {a} plus {a}?", "answer": str(2 * a)} for a in range(1, 11)]
    src = root / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "prepared"
    assert dp.main(["--dataset", str(src), "--skip-upload", "--output-dir", str(out), "--val-size", "0.2"]) == 0
    return out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model, repeated_dataset):
    tmp = tmp_path_factory.mktemp("trained")
    captured = {}
    original = outputs.save_final_model

    def capture(run, trainer):
        import torch

        trainer.model.eval()
        ids = torch.tensor([run.tokenizer("<|im_start|>user\nWhat is 3 plus 3?<|im_end|>\n")["input_ids"]])
        with torch.no_grad():
            captured["logits"] = trainer.model(input_ids=ids).logits.clone()
        captured["ids"] = ids
        return original(run, trainer)

    outputs.save_final_model = capture
    try:
        code, out = train(tmp, tiny_model, repeated_dataset, "--num-epochs", "12", "--learning-rate", "1e-2",
                          "--lora-r", "8", "--lora-alpha", "16")
    finally:
        outputs.save_final_model = original
    assert code == 0
    return out, captured


def test_output_layout_and_contents(trained_run, tiny_model):
    out, _ = trained_run
    names = {p.name for p in out.iterdir()}
    assert {"final_model", "training_config.json", "training_metrics.json", "logs", "loss_curve.png"} <= names
    ckpts = sorted(p for p in out.glob("checkpoint-*"))
    assert ckpts and len(ckpts) <= 3
    final = out / "final_model"
    for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "chat_template.jinja", "reasonforge.json"):
        assert (final / f).is_file(), f
    info = json.loads((final / "reasonforge.json").read_text())
    assert info["base_model"] == str(tiny_model) and info["chat_template"] == "model"
    # The model's own template, byte for byte: what its tokenizer shipped with.
    assert (final / "chat_template.jinja").read_text() == (tiny_model / "chat_template.jinja").read_text()
    assert info["max_seq_length"] == 2048 and info["long_rows"] == "drop" and info["train_on_responses_only"] is True
    cfg = json.loads((out / "training_config.json").read_text())
    assert cfg["backend"] == "hf" and cfg["arguments"]["lora_r"] == 8 and cfg["versions"]["trl"]
    assert cfg["optim"] == "adamw_torch" and cfg["dataset_manifest_sha256"]
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["global_step"] > 0 and metrics["tokens_seen"] > 0 and metrics["trainable_parameters"] > 0
    # Start-up and the first step are reported apart from the steady rate that excludes them.
    assert metrics["time_to_first_step_s"] >= metrics["setup_s"] + metrics["first_step_s"] - 0.01
    assert metrics["first_step_s"] > 0 and metrics["steady_tokens_per_s"] > 0
    assert metrics["steady_steps"] == metrics["global_step"] - 2
    # The parts of setup are consecutive spans from process start to the loop, so they add up to setup_s.
    phases = metrics["setup_phases_s"]
    assert list(phases)[:5] == ["imports", "dataset load", "model load", "tokenise", "LoRA attach"]
    assert "trainer build" in phases and all(v >= 0 for v in phases.values())
    assert abs(sum(phases.values()) - metrics["setup_s"]) < 0.05 + 0.01 * len(phases)
    assert metrics["validation_losses"] and metrics["best_validation_loss"] == min(v["loss"] for v in metrics["validation_losses"])
    lines = [json.loads(l) for l in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in l and "tokens_per_s" in l for l in lines) and any("eval_loss" in l for l in lines)
    assert list((out / "logs").glob("events.out.tfevents.*"))
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_loss_falls_on_repeated_data(trained_run):
    metrics = json.loads((trained_run[0] / "training_metrics.json").read_text())
    losses = [h["loss"] for h in metrics["history"] if "loss" in h]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_final_model_is_best_checkpoint_and_reloads_same_logits(trained_run, tiny_model):
    import torch
    from safetensors.torch import load_file

    out, captured = trained_run
    metrics = json.loads((out / "training_metrics.json").read_text())
    best = Path(metrics["best_checkpoint"])
    final_w = load_file(str(out / "final_model" / "adapter_model.safetensors"))
    best_w = load_file(str(out / best.name / "adapter_model.safetensors"))
    assert final_w.keys() == best_w.keys() and all(torch.equal(final_w[k], best_w[k]) for k in final_w)
    model, _, _ = utils.load_model(str(tiny_model), backend="hf", adapter_path=out / "final_model")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=captured["ids"]).logits
    torch.testing.assert_close(logits, captured["logits"], rtol=1e-5, atol=1e-5)


def test_lora_weights_changed_base_weights_did_not(trained_run, tiny_model):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, _ = trained_run
    adapter = load_file(str(out / "final_model" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 2 * 7 and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero
    base_before = AutoModelForCausalLM.from_pretrained(str(tiny_model)).state_dict()
    model, _, _ = utils.load_model(str(tiny_model), backend="hf", adapter_path=out / "final_model")
    merged_base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                   for k, v in model.state_dict().items() if "lora_" not in k}
    for k, v in base_before.items():
        assert torch.equal(merged_base[k], v), k


def test_masking_in_training_rows(tiny_model, repeated_dataset):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    dd, manifest = utils.load_prepared_dataset(repeated_dataset)
    cfg = config("--max-seq-length", "256")
    name, source = sft.choose_template(cfg, manifest, tok)
    train_ds, _, counts = sft.tokenize_splits(dd, tok, source, cfg)
    assert name == "model" and counts["train"]["over_max_seq_length"] == 0
    row, msgs = train_ds[0], dd["train"][0]["messages"]
    target = tok.decode([t for t in row["labels"] if t != -100])
    assert target == f"<think>\n\n</think>\n\n{msgs[-1]['content']}<|im_end|>"
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(utils.clean_messages(msgs), tokenize=False)


def interrupt_after_step(monkeypatch, step: int):
    """Make training stop like Ctrl-C once `step` has been logged; returns a function that undoes it."""
    original = callbacks.StepLogger.on_step_end

    def crash(self, args, state, control, **kw):
        original(self, args, state, control, **kw)
        if state.global_step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(callbacks.StepLogger, "on_step_end", crash)
    return lambda: monkeypatch.setattr(callbacks.StepLogger, "on_step_end", original)


def test_interrupted_run_resumes_to_same_result(tmp_path, tiny_model, repeated_dataset, monkeypatch):
    common = ("--max-steps", "10", "--seed", "11")
    code, full = train(tmp_path, tiny_model, repeated_dataset, *common, out="full")
    assert code == 0
    restore = interrupt_after_step(monkeypatch, 6)
    code, part = train(tmp_path, tiny_model, repeated_dataset, *common, out="part")
    assert code == 130 and not (part / "final_model").exists()
    restore()
    code, part = train(tmp_path, tiny_model, repeated_dataset, *common, "--resume-from-checkpoint", "latest", out="part")
    assert code == 0
    a = json.loads((full / "training_metrics.json").read_text())
    b = json.loads((part / "training_metrics.json").read_text())
    assert a["global_step"] == b["global_step"] == 10
    # Same data order, optimizer, scheduler and RNG state: the losses after the resume point match.
    tail_a = [h["loss"] for h in a["history"] if "loss" in h and h["step"] > 4]
    tail_b = [h["loss"] for h in b["history"] if "loss" in h and h["step"] > 4]
    assert tail_a == pytest.approx(tail_b, rel=1e-4)
    assert a["best_validation_loss"] == pytest.approx(b["best_validation_loss"], rel=1e-4)


def test_truncated_newest_checkpoint_falls_back(tmp_path, tiny_model, repeated_dataset, capsys):
    code, out = train(tmp_path, tiny_model, repeated_dataset, "--max-steps", "8")
    assert code == 0
    newest = out / "checkpoint-8" / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    capsys.readouterr()
    # 8 training rows at batch 4 make a 2-step epoch, and every epoch end is validated and saved.
    assert checkpoints.resolve_resume("latest", out, run_uri=None) == str(out / "checkpoint-6")
    err = capsys.readouterr().err  # the suite's logger does not propagate to pytest's root handler
    assert "skipping" in err and "truncated" in err


@pytest.mark.s3
def test_checkpoints_sync_to_s3_and_resume_into_empty_folder(tmp_path, tiny_model, repeated_dataset, s3_env, monkeypatch):
    common = ("--max-steps", "8", "--s3-bucket", s3_env, "--run-name", "drill")
    restore = interrupt_after_step(monkeypatch, 5)
    code, out = train(tmp_path, tiny_model, repeated_dataset, *common)
    assert code == 130
    run_uri = utils.S3Uri(s3_env, "adapters/drill")
    assert checkpoints.s3_complete_checkpoints(run_uri)[-1] == 4
    import shutil

    shutil.rmtree(out)  # the instance is gone
    restore()
    code, out = train(tmp_path, tiny_model, repeated_dataset, *common, "--resume-from-checkpoint", "latest")
    assert code == 0
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["global_step"] == 8
    logged_here = [json.loads(l)["step"] for l in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert min(logged_here) == 5  # this instance continued from step 4, not from scratch
    assert [h["step"] for h in metrics["history"] if "loss" in h] == list(range(1, 9))
    objects = utils.list_s3_objects(utils.s3_client(), run_uri)
    assert "final_model/adapter_model.safetensors" in objects and "checkpoints/checkpoint-8/reasonforge_checkpoint.json" in objects
    assert "training_metrics.json" in objects


BAD = [
    (["--dataset-path", "{tmp}/nope"], "does not exist"),
    (["--dataset-path", "{nomanifest}"], "no manifest.json"),
    (["--model-name", "{tmp}/no-model"], "does not exist"),
    (["--target-modules", "q_proj,qkv_fused"], "its linear modules are"),
    (["--max-seq-length", "16"], "is shorter than every train row"),
    (["--resume-from-checkpoint", "{tmp}/missing-ckpt"], "is not a folder"),
    (["--learning-rate", "5"], "--learning-rate 5.0 must be in (0, 1)"),
    (["--save-steps", "10", "--eval-steps", "3"], "must be a multiple of --eval-steps"),
    (["--backend", "unsloth"], "needs a CUDA GPU"),
    (["--packing"], "would let packed rows attend to each other"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_input_one_line_exit_2(tmp_path, tiny_model, repeated_dataset, capsys, extra, message):
    nomanifest = tmp_path / "nomanifest"
    nomanifest.mkdir()
    extra = [e.format(tmp=tmp_path, nomanifest=nomanifest) for e in extra]
    argv = ["--model-name", str(tiny_model), "--dataset-path", str(repeated_dataset), "--output-dir", str(tmp_path / "o"),
            "--max-steps", "2"]
    code = train_lora.main(argv + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and message in err[-1], err[-3:]
    assert not (tmp_path / "o" / "final_model").exists()


def test_missing_split_is_reported(tmp_path, repeated_dataset):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(repeated_dataset, broken)
    shutil.rmtree(broken / "validation")
    (broken / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(utils.UserError, match=r"lacks split\(s\) \['validation'\]"):
        utils.load_prepared_dataset(broken)


@pytest.mark.gpu
def test_unsloth_4bit_trains_saves_reloads(tmp_path, sample_dataset):
    import os

    import torch

    model = os.environ.get("RF_GPU_TEST_MODEL")
    if not model:
        pytest.skip("set RF_GPU_TEST_MODEL to a local Qwen folder")
    code, out = train(tmp_path, model, sample_dataset, "--backend", "unsloth", "--max-steps", "6", "--batch-size", "2")
    assert code == 0
    cfg = json.loads((out / "training_config.json").read_text())
    assert cfg["backend"] == "unsloth" and cfg["load_in_4bit"] and cfg["optim"] == "adamw_8bit"
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["peak_gpu_memory_gib"] > 0
    m, tok, info = utils.load_model(model, backend="unsloth", adapter_path=out / "final_model")
    assert info["backend"] == "unsloth"
    ids = tok("<|im_start|>user\nHi<|im_end|>\n", return_tensors="pt").input_ids.to(m.device)
    with torch.no_grad():
        assert torch.isfinite(m(input_ids=ids).logits).all()


def _packed_attention_inputs(lengths, heads=16, kv_heads=2, dim=128):
    import itertools

    import torch

    torch.manual_seed(0)
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, *itertools.accumulate(lengths)], device="cuda", dtype=torch.int32)
    return q, k, v, cu


def _attention_reference(q, k, v, spans, window=None):
    """fp32 causal SDPA over each (start, end) span, concatenated; `window` keeps the last N keys."""
    import torch
    import torch.nn.functional as F

    outs = []
    for start, end in spans:
        qs, ks, vs = (x[start:end].transpose(0, 1).float()[None] for x in (q, k, v))
        pos = torch.arange(end - start, device=q.device)
        keep = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - (window or end))
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=keep, enable_gqa=True)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128])
def test_flash_varlen_matches_attention_per_document(window):
    """The kernel train_lora gives Unsloth for packed rows: output and all three gradients against fp32
    attention computed document by document, at Qwen2.5-3B's head layout (16 query, 2 K/V heads),
    causal and with a sliding window as Unsloth spells it ((window - 1, 0))."""
    import torch

    if not acceleration.flash_varlen_available():
        pytest.skip("torch has no flash kernel for this GPU")
    lengths = [300, 57, 1024, 300, 411, 1]
    q, k, v, cu = _packed_attention_inputs(lengths)
    spelled = (-1, 0) if window is None else (window - 1, 0)
    out = acceleration.flash_varlen_attention()(q, k, v, cu, cu, max(lengths), max(lengths), window_size=spelled,
                                              enable_gqa=True)
    grad = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    spans = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    ref = _attention_reference(q, k, v, spans, window)
    want = [ref, *torch.autograd.grad(ref, (q, k, v), grad.float())]

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    errors = [rel(g, w) for g, w in zip(got, want)]
    assert max(errors) < 2e-2, errors
    # the same row attended as one causal sequence differs far beyond that: the check can tell leaks
    leaked = _attention_reference(q, k, v, [(0, sum(lengths))], window)
    assert rel(out, leaked) > 10 * max(errors)


@pytest.mark.gpu
def test_packed_unsloth_training_runs_one_varlen_call_per_layer(tmp_path, sample_dataset, monkeypatch):
    import os

    model = os.environ.get("RF_GPU_TEST_MODEL")
    if not model:
        pytest.skip("set RF_GPU_TEST_MODEL to a local Qwen folder")
    utils.import_unsloth_first()
    from unsloth.utils import attention_dispatch as dispatch

    if dispatch._TORCH_VARLEN_ATTN is not None or dispatch.HAS_XFORMERS or dispatch.HAS_FLASH_ATTENTION:
        pytest.skip("this torch/Unsloth already has a varlen route of its own")
    for name in ("_TORCH_VARLEN_ATTN", "_LEAN_VARLEN"):  # put Unsloth back as it was afterwards
        monkeypatch.setattr(dispatch, name, getattr(dispatch, name))
    calls, make_kernel = [], acceleration.flash_varlen_attention

    def counted():
        kernel = make_kernel()
        return lambda *a, **kw: calls.append(a[3].numel() - 1) or kernel(*a, **kw)

    monkeypatch.setattr(acceleration, "flash_varlen_attention", counted)
    code, out = train(tmp_path, model, sample_dataset, "--backend", "unsloth", "--packing", "--max-seq-length", "512",
                      "--max-steps", "3", "--batch-size", "1")
    assert code == 0
    cfg = json.loads((out / "training_config.json").read_text())
    assert cfg["packed_attention"].startswith("torch flash varlen")
    layers = json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]
    assert len(calls) >= 3 * layers and max(calls) > 1  # every layer, and rows holding several documents
    history = json.loads((out / "training_metrics.json").read_text())["history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert dispatch._TORCH_VARLEN_ATTN is None  # the routing was undone when training ended


def test_packed_attention_route_installs_a_kernel_only_where_unsloth_would_split():
    from types import SimpleNamespace

    route = acceleration.route_packed_attention

    def dispatch(**kw):
        return SimpleNamespace(**{"HAS_FLASH_ATTENTION": False, "HAS_XFORMERS": False, "_TORCH_VARLEN_ATTN": None,
                                  "_LEAN_VARLEN": True, "_SDPA_PACKED_SEGMENTS": True, **kw})

    kernel = SimpleNamespace(reasonforge_flash_varlen=True)
    for ready, expected in ((dict(HAS_FLASH_ATTENTION=True), "flash-attn varlen"),
                            (dict(HAS_XFORMERS=True), "xformers block-diagonal"),
                            (dict(HAS_XFORMERS=True, _NATIVE_BEATS_XFORMERS=True, _TORCH_VARLEN_ATTN=print),
                             "torch varlen_attn"),  # torch >= 2.12: Unsloth prefers torch's varlen to xformers
                            (dict(_TORCH_VARLEN_ATTN=print), "torch varlen_attn")):
        d = dispatch(**ready)
        before = vars(d).copy()
        name, undo = route(d, True, lambda: kernel)
        assert name == expected and d._TORCH_VARLEN_ATTN is not kernel
        undo()
        assert vars(d) == before
    d = dispatch()
    name, undo = route(d, False, lambda: kernel)
    assert "no flash kernel" in name and d._TORCH_VARLEN_ATTN is None
    name, undo = route(d, True, lambda: kernel)
    assert name.startswith("torch flash varlen")
    assert d._TORCH_VARLEN_ATTN is kernel and d._LEAN_VARLEN is False
    again, undo_again = route(d, True, lambda: object())
    assert again.startswith("torch flash varlen") and d._TORCH_VARLEN_ATTN is kernel  # installed once
    undo_again()
    assert d._TORCH_VARLEN_ATTN is kernel  # the second call wrote nothing, so it undoes nothing
    undo()  # Unsloth's own values back: the routing does not outlive the run
    assert d._TORCH_VARLEN_ATTN is None and d._LEAN_VARLEN is True
    bare = SimpleNamespace(HAS_FLASH_ATTENTION=False, HAS_XFORMERS=False, _TORCH_VARLEN_ATTN=None,
                           _SDPA_PACKED_SEGMENTS=True)  # an Unsloth without the lean path
    _, undo = route(bare, True, lambda: kernel)
    undo()
    assert vars(bare) == {"HAS_FLASH_ATTENTION": False, "HAS_XFORMERS": False, "_TORCH_VARLEN_ATTN": None,
                          "_SDPA_PACKED_SEGMENTS": True}
    old = SimpleNamespace(HAS_FLASH_ATTENTION=False, HAS_XFORMERS=False)  # an Unsloth without the hook
    assert "no varlen hook" in route(old, True, lambda: kernel)[0]
    dense = dispatch(_SDPA_PACKED_SEGMENTS=False)  # Unsloth would not call a varlen kernel at all
    assert "dense block-diagonal mask" in route(dense, True, lambda: kernel)[0]
    assert dense._TORCH_VARLEN_ATTN is None


def test_packed_attention_route_respects_unsloth_switch(monkeypatch):
    from types import SimpleNamespace

    d = SimpleNamespace(HAS_FLASH_ATTENTION=False, HAS_XFORMERS=False, _TORCH_VARLEN_ATTN=None,
                        _SDPA_PACKED_SEGMENTS=True)
    monkeypatch.setenv("UNSLOTH_TORCH_VARLEN", "0")
    assert "UNSLOTH_TORCH_VARLEN=0" in acceleration.route_packed_attention(d, True, object)[0]
    assert d._TORCH_VARLEN_ATTN is None


def test_what_setup_changes_outside_the_run_is_undone_however_it_ends(tmp_path, tiny_model, repeated_dataset,
                                                                     monkeypatch):
    """The packed-attention routing writes Unsloth's module state; it is put back when the training
    loop ends (before the outputs are written), and at once when setup fails after it."""
    undone = []
    real = acceleration.configure_packed_attention

    def recorded(packing, backend, model):
        route, undo = real(packing, backend, model)
        return route, lambda: (undo(), undone.append((tmp_path / "ok" / "final_model").exists()))

    monkeypatch.setattr(acceleration, "configure_packed_attention", recorded)
    code, _ = train(tmp_path, tiny_model, repeated_dataset, "--max-steps", "2", out="ok")
    assert code == 0 and undone == [False] and (tmp_path / "ok" / "final_model").is_dir()
    code, _ = train(tmp_path, tiny_model, repeated_dataset, "--max-steps", "2", "--max-seq-length", "16", out="bad")
    assert code == 2 and len(undone) == 2


def test_micro_batching_does_not_change_the_loss_curve(tmp_path, tiny_model, sample_dataset):
    """What --auto-batch changes (micro-batch x accumulation at the same product) leaves the
    per-step losses as they were: the loss is a token-level mean over the whole effective batch."""
    curves = []
    for micro, accum in ((2, 4), (8, 1)):
        out = tmp_path / f"mb{micro}"
        code = train_lora.main(["--model-name", str(tiny_model), "--dataset-path", str(sample_dataset), "--output-dir",
                                str(out), "--max-steps", "5", "--save-steps", "5", "--batch-size", str(micro),
                                "--gradient-accumulation-steps", str(accum), "--learning-rate", "5e-3", "--seed", "2"])
        assert code == 0
        history = json.loads((out / "training_metrics.json").read_text())["history"]
        curves.append([h["loss"] for h in history if "loss" in h])
    assert len(curves[0]) == 5
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)


def test_auto_batch_plan_keeps_effective_batch_and_budget():
    from transformers import Qwen2Config

    shape = Qwen2Config(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                        num_key_value_heads=2)
    roomy = acceleration.plan_auto_batch(shape, 2048, 8, budget_gib=79, base_gib=2.5)
    small = acceleration.plan_auto_batch(shape, 2048, 8, budget_gib=24, base_gib=2.5)
    tiny = acceleration.plan_auto_batch(shape, 2048, 8, budget_gib=6, base_gib=2.5)
    assert (roomy["batch_size"], roomy["gradient_checkpointing"]) == (8, "off")
    # At 24 GB only micro-batch 2 fits without checkpointing; one checkpointed pass of 8 is cheaper.
    assert (small["batch_size"], small["gradient_checkpointing"]) == (8, "unsloth")
    assert small["predicted_peak_gib"] <= 0.85 * 24
    assert tiny["gradient_checkpointing"] == "unsloth" and tiny["predicted_peak_gib"] <= 0.85 * 6
    for plan in (roomy, small, tiny):
        assert plan["batch_size"] * plan["gradient_accumulation_steps"] == 8 and plan["fits"]


def test_configure_compiler_takes_the_cpp_wrapper_only_where_it_can_and_pays(monkeypatch):
    import torch._inductor.config as inductor

    long_run = acceleration.CPP_WRAPPER_MIN_STEPS
    monkeypatch.setattr(inductor, "cpp_wrapper", False)
    monkeypatch.delenv("TORCHINDUCTOR_CPP_WRAPPER", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    assert acceleration.configure_compiler("hf", "auto", long_run) == "no compiled graphs on this backend"
    assert inductor.cpp_wrapper is False

    monkeypatch.setattr(acceleration.shutil, "which", lambda name: None)
    assert "no C++ compiler found" in acceleration.configure_compiler("unsloth", "auto", long_run)
    assert inductor.cpp_wrapper is False

    monkeypatch.setattr(acceleration.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "clang++" else None)
    note = acceleration.configure_compiler("unsloth", "auto", long_run)
    assert note.startswith(f"C++ wrapper ({long_run} planned steps repay its build; clang++")
    assert inductor.cpp_wrapper is True

    # A short run (a quick experiment, a resume near the end) is not worth the build.
    note = acceleration.configure_compiler("unsloth", "auto", long_run - 1)
    assert note.startswith(f"Python wrapper ({long_run - 1} planned steps, fewer than the {long_run}")
    assert inductor.cpp_wrapper is False
    assert acceleration.configure_compiler("unsloth", "cpp", 5).startswith("C++ wrapper (--graph-wrapper cpp")
    assert acceleration.configure_compiler("unsloth", "python", 10_000) == "Python wrapper (--graph-wrapper python)"
    assert inductor.cpp_wrapper is False

    monkeypatch.setenv("TORCHINDUCTOR_CPP_WRAPPER", "1")  # the user's choice wins
    assert acceleration.configure_compiler("unsloth", "auto", 1) == "TORCHINDUCTOR_CPP_WRAPPER=1 as set"
    assert inductor.cpp_wrapper is False


def test_planned_steps():
    batch = acceleration.BatchPlan(batch_size=2, gradient_accumulation_steps=4, gradient_checkpointing="auto")
    assert acceleration.planned_steps(100, batch, epochs=3) == 3 * 13  # 50 micro-batches -> 13 steps an epoch
    assert acceleration.planned_steps(100, batch, epochs=3, done=30) == 9
    assert acceleration.planned_steps(100, batch, epochs=3, max_steps=30) == 30
    assert acceleration.planned_steps(100, batch, epochs=3, max_steps=30, processes=2) == 30


def test_config_holds_every_flag_in_the_parsers_order(tmp_path):
    """training_config.json's "arguments" are the config's fields: the same keys, in the same order,
    as the parsed flags, with --run-name and the method's --learning-rate resolved."""
    import dataclasses

    args = train_lora.build_parser().parse_args(["--output-dir", str(tmp_path / "my-run")])
    cfg = training.TrainConfig.from_args(args)
    assert [f.name for f in dataclasses.fields(cfg)] == list(vars(args))
    assert dataclasses.asdict(cfg) == {**vars(args), "run_name": "my-run", "learning_rate": 2e-4}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 8


@pytest.mark.gpu
def test_unsloth_micro_batching_keeps_losses_token_weighted(tmp_path, sample_dataset, capfd):
    """On the Unsloth backend, 2 x 4 and 8 x 1 give the same per-step losses on rows of different
    lengths: each micro-batch loss is divided by the target tokens of the whole effective batch
    (num_items_in_batch), not averaged per micro-batch. The validation loss the Trainer picks the best
    checkpoint on is the one evaluate_model.py reports."""
    import os

    import evaluate_model

    model = os.environ.get("RF_GPU_TEST_MODEL")
    if not model:
        pytest.skip("set RF_GPU_TEST_MODEL to a local Qwen folder")
    curves, runs = [], []
    for micro, accum in ((2, 4), (8, 1)):
        code, out = train(tmp_path, model, sample_dataset, "--backend", "unsloth", "--max-steps", "4", "--save-steps", "4",
                          "--eval-steps", "4", "--batch-size", str(micro), "--gradient-accumulation-steps", str(accum),
                          "--learning-rate", "2e-4", "--seed", "2", out=f"mb{micro}")
        assert code == 0
        history = json.loads((out / "training_metrics.json").read_text())["history"]
        curves.append([h["loss"] for h in history if "loss" in h])
        runs.append(out)
    print("per-step losses 2x4:", curves[0], "8x1:", curves[1])
    assert len(curves[0]) == 4 and curves[0] == pytest.approx(curves[1], rel=1e-3)
    report = tmp_path / "e.json"
    assert evaluate_model.main(["--model-path", str(runs[1] / "final_model"), "--dataset-path", str(sample_dataset),
                                "--backend", "unsloth", "--compute-perplexity", "--batch-size", "8",
                                "--output-file", str(report)]) == 0
    reported = json.loads(report.read_text())["metrics"]["perplexity"]["finetuned"]["avg_loss"]
    trainer = json.loads((runs[1] / "training_metrics.json").read_text())["best_validation_loss"]
    print("validation loss: trainer", trainer, "evaluate_model", reported)
    assert trainer == pytest.approx(reported, rel=2e-3)
