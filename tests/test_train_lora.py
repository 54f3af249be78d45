"""train_lora.py end to end on CPU (tiny random Qwen, real tokenizer): outputs, learning, resume, bad input."""

import json
from pathlib import Path

import pytest

import train_lora
from reasonforge import callbacks, checkpoints, outputs, sft, training
import utils
from conftest import train


def config(*argv) -> training.TrainConfig:
    return training.TrainConfig.from_args(train_lora.build_parser().parse_args(list(argv)))


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


@pytest.mark.slow
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
    assert metrics["time_to_first_step_s"] >= metrics["setup_s"] + metrics["first_step_s"] - 0.02  # three roundings to 0.01
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    (["--cuda-graphs", "on", "--packing"], "--cuda-graphs on: packed rows run outside"),
    (["--cuda-graphs", "on", "--backend", "hf"], "--cuda-graphs on: the hf backend has no compiled blocks"),
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


def test_config_holds_every_flag_in_the_parsers_order(tmp_path):
    """training_config.json's "arguments" are the config's fields: the same keys, in the same order,
    as the parsed flags, with --run-name and the method's --learning-rate resolved."""
    import dataclasses

    args = train_lora.build_parser().parse_args(["--output-dir", str(tmp_path / "my-run")])
    cfg = training.TrainConfig.from_args(args)
    # plus where each value came from, which --config's parser adds (none here: plain parse_args)
    assert [f.name for f in dataclasses.fields(cfg)] == [*vars(args), "settings_from"]
    assert dataclasses.asdict(cfg) == {**vars(args), "run_name": "my-run", "learning_rate": 2e-4, "settings_from": {}}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 8
