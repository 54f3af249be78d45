"""The scripts as shell users chain them: output into a pipe that closes early (`| head`), bytes
that are not UTF-8 in arguments or typed into the chat, damaged model folders, a missing PYTHON,
Ctrl-C as a chat reply starts. Each ends in one `error:` line and exit 2, or carries on; never a
traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import one_error_line
from reasonforge.generation import GenerationSettings

ROOT = Path(__file__).resolve().parents[1]


def script(name: str, *args, stdin=None, **popen):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / name), *map(os.fsencode, args)], cwd=ROOT, env=env,
                            stdin=stdin, **popen)


def read_then_close(proc, lines: int) -> tuple[int, str]:
    """`| head -N`: read N lines of stdout, close the pipe, wait for the process."""
    got = [proc.stdout.readline() for _ in range(lines)]
    proc.stdout.close()
    err = proc.stderr.read().decode(errors="replace")
    return proc.wait(timeout=600), "".join(x.decode() for x in got) + err


@pytest.mark.slow
def test_training_into_a_pipe_that_closes_keeps_training(tiny_model, sample_dataset, tmp_path):
    out = tmp_path / "run"
    proc = script("train_lora.py", "--model-name", str(tiny_model), "--dataset-path", str(sample_dataset),
                  "--output-dir", str(out), "--max-steps", "6", "--save-steps", "3", "--eval-steps", "3",
                  "--batch-size", "2", "--gradient-accumulation-steps", "1", "--warmup-steps", "0",
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    code, text = read_then_close(proc, 3)
    assert code == 0 and "Traceback" not in text and "BrokenPipeError" not in text, text[-2000:]
    steps = [json.loads(l)["step"] for l in (out / "logs" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps[-1] == 6 and (out / "final_model" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name, args", [
    ("test_model.py", ["--instruction", "hi", "--max-new-tokens", "4"]),
    ("evaluate_model.py", ["--dataset-path", "{data}", "--compute-perplexity", "--max-eval-samples", "2",
                           "--output-file", "{tmp}/e.json"]),
])
@pytest.mark.slow
def test_inference_into_a_closed_pipe_ends_quietly(tiny_model, sample_dataset, tmp_path, name, args):
    """`... | head -c1`: the reader is gone before the script has said anything much."""
    args = [a.format(data=sample_dataset, tmp=tmp_path) for a in args]
    proc = script(name, "--model-path", str(tiny_model), "--output-file", str(tmp_path / "r.json"), *args,
                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc.stdout.read(1)
    proc.stdout.close()
    assert proc.wait(timeout=300) == 0


@pytest.mark.parametrize("name, args, flag", [
    ("test_model.py", ["--model-path", "m", "--instruction", b"caf\xe9"], "--instruction"),
    ("test_model.py", ["--model-path", "m", "--system-prompt", b"sys\xff", "--instruction", "hi"], "--system-prompt"),
    ("train_lora.py", ["--model-name", "m", "--dataset-path", "d", "--output-dir", b"OUT_\xff"], "--output-dir"),
    ("evaluate_model.py", ["--model-path", "m", "--dataset-path", b"d\xfe"], "--dataset-path"),
    ("data_preparation.py", ["--dataset", b"x\xff.jsonl"], "--dataset"),
])
def test_arguments_that_are_not_utf8_are_one_error_line(tmp_path, name, args, flag):
    proc = script(name, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, err.decode()[-1500:]
    assert lines[0].startswith(f"error: the value of {flag} is not UTF-8 text")
    assert not (tmp_path / "OUT_").exists()


def test_chat_refuses_a_line_that_is_not_utf8_and_goes_on(tiny_model, tmp_path):
    proc = script("test_model.py", "--model-path", str(tiny_model), "--interactive", "--max-new-tokens", "3",
                  "--output-file", str(tmp_path / "chat.json"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE)
    out, err = proc.communicate(b"\xff\xfe\nhello\nquit\n", timeout=300)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()[-1500:]
    assert b"refused: that line is not UTF-8 text" in out
    turns = json.loads((tmp_path / "chat.json").read_text())["results"]
    assert [t["instruction"] for t in turns] == ["hello"]


def test_ctrl_c_as_a_reply_starts_stops_only_that_reply(monkeypatch, capsys):
    """A Ctrl-C landing before the reply's own handler (as `assistant>` is printed) stopped the whole
    chat with exit 130 and no chat.json."""
    from reasonforge import chat

    calls = []

    def turn(model, tokenizer, text, *a, **k):
        calls.append(text)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return {"instruction": text, "response": "ok", "tokens": 1, "seconds": 0.0, "stopped": True}

    monkeypatch.setattr(chat, "chat_turn", turn)
    answers = iter(["first", "second", "quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    turns, _ = chat.interactive(None, None, GenerationSettings(), None)
    assert [t.get("interrupted", False) for t in turns] == [True, False]
    assert "[reply stopped" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["empty_config", "cut_weights"])
def test_a_damaged_model_folder_is_one_error_line(tiny_model, sample_dataset, tmp_path, capsys, damage):
    import shutil

    import evaluate_model
    import train_lora

    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    if damage == "empty_config":
        (broken / "config.json").write_text("{}")
    else:
        data = (broken / "model.safetensors").read_bytes()
        (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    out = tmp_path / "run"
    assert train_lora.main(["--model-name", str(broken), "--dataset-path", str(sample_dataset),
                            "--output-dir", str(out), "--max-steps", "1"]) == 2
    assert "cannot be loaded" in one_error_line(capsys) and not out.exists()  # no empty folder left behind
    assert evaluate_model.main(["--model-path", str(broken), "--dataset-path", str(sample_dataset),
                                "--compute-perplexity", "--max-eval-samples", "2",
                                "--output-file", str(tmp_path / "e.json")]) == 2
    assert "files look damaged or incomplete" in one_error_line(capsys)


@pytest.mark.parametrize("python, words", [("/nonexistent/python", "cannot be run"),
                                            ("no-packages", "cannot import the suite's packages")])
def test_pipeline_with_an_unusable_python_speaks_as_the_scripts_do(tmp_path, python, words):
    if python == "no-packages":  # an interpreter without the suite installed: its imports fail
        fake = tmp_path / "python"
        fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named datasets' >&2\nexit 1\n")
        fake.chmod(0o755)
        python = str(fake)
    env = {**os.environ, "PYTHON": python, "WORK": str(tmp_path / "w")}
    done = subprocess.run(["bash", str(ROOT / "run_pipeline.sh")], env=env, capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert words in lines[0] and not (tmp_path / "w").exists()


@pytest.mark.parametrize("setting, words", [("GGUF=q4", "GGUF=q4 is not a GGUF type"),
                                            ("EVAL_ROWS=0", "EVAL_ROWS=0 must be a positive whole number"),
                                            ("BATCH=two", "BATCH=two must be a positive whole number")])
def test_pipeline_settings_are_checked_before_anything_runs(tmp_path, setting, words):
    name, value = setting.split("=")
    env = {**os.environ, name: value, "WORK": str(tmp_path / "w")}
    done = subprocess.run(["bash", str(ROOT / "run_pipeline.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == f"error: {words}" + (
        "; use q8_0, f16 or bf16 (or leave it unset)" if name == "GGUF" else ""), done.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("argv, words", [
    (["--lora-alpha", "nan"], "argument --lora-alpha: invalid int value: 'nan'; see train_lora.py --help"),
    (["--max-steps", "1e3"], "argument --max-steps: invalid int value: '1e3'"),
    (["--save-gguf", "bogus"], "argument --save-gguf: invalid choice: 'bogus'"),
    (["--batch-size", "100000000000000000000"], "--batch-size 100000000000000000000 is too large"),
    (["--eval-steps", "-3"], "--eval-steps -3 must be a positive number of steps"),
])
def test_argument_mistakes_are_one_error_line(argv, words, capsys, no_model_load):
    import train_lora

    assert train_lora.main(argv) == 2
    assert words in one_error_line(capsys)


def test_output_dir_inside_another_runs_checkpoint_is_refused(tmp_path, capsys, no_model_load):
    import train_lora

    ckpt = tmp_path / "run" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "reasonforge_checkpoint.json").write_text("{}")
    (ckpt / "training_config.json").write_text("{}")
    assert train_lora.main(["--output-dir", str(ckpt)]) == 2
    assert "is a checkpoint or adapter of another run" in one_error_line(capsys)
    assert train_lora.main(["--output-dir", str(ckpt / "sub")]) == 2
    assert f"is inside {ckpt}" in one_error_line(capsys)


def test_a_missing_model_is_named_before_the_data(tmp_path, capsys):
    import evaluate_model

    assert evaluate_model.main(["--model-path", str(tmp_path / "run" / "final_model"), "--compute-perplexity"]) == 2
    assert "--model-path" in one_error_line(capsys)


@pytest.mark.parametrize("env, words", [({"RF_PROGRESS": "garbage"}, "RF_PROGRESS='garbage' is not a progress mode"),
                                        ({"RF_PROGRESS_INTERVAL_S": "nan"}, "RF_PROGRESS_INTERVAL_S='nan'")])
def test_progress_settings_that_make_no_sense_are_refused(env, words, tmp_path, monkeypatch, capsys):
    import data_preparation

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert data_preparation.main(["--dataset", "sample", "--max-samples", "10", "--skip-upload",
                                  "--output-dir", str(tmp_path / "o")]) == 2
    assert words in one_error_line(capsys)


@pytest.fixture
def saved_adapter(tiny_model, tmp_path):
    """An untrained LoRA adapter on the tiny model, saved as training saves one (recorded base included)."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model)),
                           LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(str(folder))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model)
    return folder


@pytest.mark.parametrize("damage, words", [
    ("empty", "adapter file {weights} is damaged or incomplete (0 bytes"),
    ("cut", "adapter file {weights} is damaged or incomplete"),
    ("bad_rank", "is not a valid adapter config"),
    ("moved_base", "records its base model as '/nonexistent/base', which does not exist here; pass --base-model"),
])
def test_a_damaged_adapter_is_one_error_line(saved_adapter, tmp_path, capsys, damage, words):
    import json

    import test_model as tm

    weights = saved_adapter / "adapter_model.safetensors"
    if damage == "empty":
        weights.write_bytes(b"")
    elif damage == "cut":
        weights.write_bytes(weights.read_bytes()[:300])
    else:
        config = json.loads((saved_adapter / "adapter_config.json").read_text())
        config.update({"r": -3} if damage == "bad_rank" else {"base_model_name_or_path": "/nonexistent/base"})
        (saved_adapter / "adapter_config.json").write_text(json.dumps(config))
    assert tm.main(["--model-path", str(saved_adapter), "--instruction", "hi", "--max-new-tokens", "2",
                    "--output-file", str(tmp_path / "o.json")]) == 2
    assert words.format(weights=weights) in one_error_line(capsys)
    assert not (tmp_path / "o.json").exists()


def test_a_model_folder_without_a_tokenizer_and_a_run_folder_are_named(tiny_model, sample_dataset, tmp_path, capsys,
                                                                       no_model_load):
    import shutil

    import evaluate_model
    import train_lora

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare, ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "merges*",
                                                                    "special_tokens*", "added_tokens*", "chat_template*"))
    assert train_lora.main(["--model-name", str(bare), "--dataset-path", str(sample_dataset),
                            "--output-dir", str(tmp_path / "o")]) == 2
    assert f"model folder {str(bare)!r} has no tokenizer" in one_error_line(capsys)
    run = tmp_path / "run"
    (run / "final_model").mkdir(parents=True)
    (run / "final_model" / "adapter_config.json").write_text("{}")
    assert evaluate_model.main(["--model-path", str(run), "--dataset-path", str(sample_dataset),
                                "--output-file", str(tmp_path / "e.json")]) == 2
    assert f"for the run's model pass {run / 'final_model'}" in one_error_line(capsys)
