"""The seed's commands as written, on the seed's model family: the model's own template, no
leakage across the split, no silent truncation, evaluation measuring what training trained."""

import json

import pytest

import data_preparation as dp
import evaluate_model as ev
import train_lora
import utils
from reasonforge import sft, training


def seed_style_rows(n=24):
    """Rows in the seed dataset's schema (question/answer), with reasoning to keep."""
    return [{"question": f"What is {a} times 3?", "answer": str(3 * a), "reasoning": f"{a} x 3 = {3 * a}"}
            for a in range(1, n + 1)]


@pytest.fixture(scope="module")
def seed_prepared(tmp_path_factory):
    """Prepared as the seed's command does it: no --tokenizer, no --chat-template."""
    root = tmp_path_factory.mktemp("seedprep")
    src = root / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in seed_style_rows()))
    assert dp.main(["--dataset", str(src), "--skip-upload", "--output-dir", str(root / "out"), "--val-size", "0.25"]) == 0
    return root / "out"


def train(tmp_path, model, data, *extra, out="run"):
    target = tmp_path / out
    code = train_lora.main(["--model-name", str(model), "--dataset-path", str(data), "--output-dir", str(target),
                            "--max-steps", "2", "--save-steps", "2", "--batch-size", "4", "--warmup-steps", "0", *extra])
    return code, target


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2.5", "qwen3"])
def test_training_renders_with_the_models_own_template(tmp_path, seed_prepared, tiny_qwen25, tiny_model, family):
    """The adapter keeps the base's template byte for byte, and every training row is exactly what
    the base tokenizer's apply_chat_template renders (Qwen2.5: its system prompt, no <think>)."""
    from transformers import AutoTokenizer

    model = tiny_qwen25 if family == "qwen2.5" else tiny_model
    base_tok = AutoTokenizer.from_pretrained(str(model))
    dd, manifest = utils.load_prepared_dataset(seed_prepared)
    config = training.TrainConfig.from_args(train_lora.build_parser().parse_args(["--model-name", str(model)]))
    name, source = sft.choose_template(config, manifest, base_tok)
    assert source == base_tok.chat_template
    tok = AutoTokenizer.from_pretrained(str(model))
    train_ds, _, _ = sft.tokenize_splits(dd, tok, source, config)
    for row, messages in zip(train_ds, dd["train"]["messages"]):
        expected = base_tok.apply_chat_template(utils.clean_messages(messages, source), tokenize=False)
        assert tok.decode(row["input_ids"]) == expected
        if family == "qwen2.5":
            assert "<think>" not in expected and expected.startswith("<|im_start|>system\nYou are Qwen")
            assert "x 3 =" in expected  # the reasoning column is kept, in front of the answer
    code, out = train(tmp_path, model, seed_prepared)
    assert code == 0
    assert (out / "final_model" / "chat_template.jinja").read_text() == base_tok.chat_template
    # Evaluation and chat load the adapter's tokenizer: the same template as the base's own.
    _, tok2, _, _ = utils.load_for_inference(ev.build_parser().parse_args(["--model-path", str(out / "final_model")]))
    prompt = [{"role": "user", "content": "hi"}]
    assert utils.render_chat(prompt, tokenizer=tok2, add_generation_prompt=True) == \
        base_tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
def test_a_recorded_template_that_does_not_fit_is_refused(tmp_path, tiny_qwen25, capsys):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in seed_style_rows(12)))
    prepared = tmp_path / "prep"
    assert dp.main(["--dataset", str(src), "--skip-upload", "--output-dir", str(prepared), "--chat-template", "qwen3"]) == 0
    code, _ = train(tmp_path, tiny_qwen25, prepared, "--chat-template", "dataset")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: the dataset's recorded template 'qwen3' does not fit")
    assert "<think> is not a token" in err[-1] and "--chat-template auto" in err[-1]
    # Named explicitly, it is the user's call: a warning, and training goes on.
    code, out = train(tmp_path, tiny_qwen25, prepared, "--chat-template", "qwen3", out="explicit")
    assert code == 0 and (out / "final_model" / "chat_template.jinja").read_text() == utils.QWEN3_TEMPLATE


@pytest.mark.slow
def test_long_rows_are_dropped_and_counted(tmp_path, tiny_model, capsys):
    rows = [{"question": f"q{i} " + "word " * (150 if i % 4 == 0 else 3), "answer": str(i)} for i in range(24)]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepared = tmp_path / "prep"
    assert dp.main(["--dataset", str(src), "--skip-upload", "--output-dir", str(prepared), "--val-size", "0.25"]) == 0
    code, out = train(tmp_path, tiny_model, prepared, "--max-seq-length", "96")
    printed = capsys.readouterr().out
    assert code == 0
    rows_cfg = json.loads((out / "training_config.json").read_text())["rows"]
    long_train, long_val = rows_cfg["train"]["over_max_seq_length"], rows_cfg["validation"]["over_max_seq_length"]
    assert long_train + long_val == 6 and rows_cfg["policy"] == "drop"
    assert rows_cfg["train"]["kept"] == rows_cfg["train"]["rows"] - long_train
    assert f"Long rows:  {long_train} train, {long_val} validation rows over 96 tokens dropped" in printed
    code, out = train(tmp_path, tiny_model, prepared, "--max-seq-length", "96", "--long-rows", "truncate", out="cut")
    rows_cfg = json.loads((out / "training_config.json").read_text())["rows"]
    # Cut, not dropped; rows whose answer started after the cut still go (nothing left to learn).
    t = rows_cfg["train"]
    assert code == 0 and t["over_max_seq_length"] == long_train and t["kept"] == t["rows"] - t["no_answer_tokens"]


def test_same_prompt_never_lands_on_both_sides(tmp_path):
    """Repeated prompts with different answers, and case/space variants of a prompt, stay together."""
    rows = []
    for i in range(20):
        rows += [{"question": f"Explain step {i}.", "answer": f"first answer {i}"},
                 {"question": f"explain  STEP {i}.", "answer": f"second answer {i}"}]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert dp.main(["--dataset", str(src), "--skip-upload", "--output-dir", str(tmp_path / "o"), "--val-size", "0.2"]) == 0
    import datasets

    dd = datasets.load_from_disk(str(tmp_path / "o"))
    train_keys = {dp.prompt_key(m) for m in dd["train"]["messages"]}
    val_keys = {dp.prompt_key(m) for m in dd["validation"]["messages"]}
    assert val_keys and not (train_keys & val_keys) and len(dd["validation"]) == 8
    stats = json.loads((tmp_path / "o" / "manifest.json").read_text())["split_by_prompt"]
    assert stats == {"prompt_groups": 20, "rows_sharing_a_prompt": 40, "near_duplicate_prompts": 20,
                     "validation_prompts_also_in_train": 0}


def test_evaluation_reads_what_training_recorded(tmp_path, tiny_model, seed_prepared):
    code, out = train(tmp_path, tiny_model, seed_prepared, "--max-seq-length", "300", "--no-train-on-responses-only")
    assert code == 0
    report = tmp_path / "eval.json"
    assert ev.main(["--model-path", str(out / "final_model"), "--dataset-path", str(seed_prepared),
                    "--compute-perplexity", "--output-file", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["settings"]["max_seq_length"] == 300 and r["settings"]["train_on_responses_only"] is False
    assert r["settings_source"]["max_seq_length"] == "recorded"
    assert ev.main(["--model-path", str(out / "final_model"), "--dataset-path", str(seed_prepared),
                    "--compute-perplexity", "--max-seq-length", "512", "--output-file", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["settings"]["max_seq_length"] == 512 and r["settings_source"]["max_seq_length"] == "flag"


def test_best_checkpoint_is_chosen_on_the_loss_evaluation_reports(tmp_path, tiny_model, seed_prepared):
    """The Trainer's validation loss is sum(NLL) / sum(target tokens) over the split, the same number
    evaluate_model.py reports as avg_loss, whatever the eval batch size."""
    # Batch 4 over 6 validation rows of different lengths: a mean of batch means would differ.
    code, out = train(tmp_path, tiny_model, seed_prepared, "--batch-size", "4")
    assert code == 0
    metrics = json.loads((out / "training_metrics.json").read_text())
    trainer_loss = metrics["validation_losses"][-1]["loss"]
    report = tmp_path / "eval.json"
    assert ev.main(["--model-path", str(out / "final_model"), "--dataset-path", str(seed_prepared),
                    "--compute-perplexity", "--output-file", str(report)]) == 0
    reported = json.loads(report.read_text())["metrics"]["perplexity"]["finetuned"]["avg_loss"]
    assert trainer_loss == pytest.approx(reported, rel=1e-4)
