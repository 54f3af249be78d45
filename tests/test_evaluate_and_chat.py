"""evaluate_model.py and test_model.py on the tiny model: honest perplexity, base pass, answers, chat."""

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

import data_preparation as dp
import evaluate_model as ev
import test_model as tm
import train_lora
import reasonforge.generation
import utils
from reasonforge import batch, chat

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("evalrun")
    data = root / "data"
    assert dp.main(["--dataset", "sample", "--max-samples", "60", "--skip-upload", "--output-dir", str(data)]) == 0
    out = root / "run"
    assert train_lora.main(["--model-name", str(tiny_model), "--dataset-path", str(data), "--output-dir", str(out),
                            "--max-steps", "4", "--save-steps", "4", "--batch-size", "4", "--gradient-accumulation-steps",
                            "1", "--learning-rate", "1e-2"]) == 0
    return data, out / "final_model"


@pytest.mark.slow
@pytest.mark.parametrize("extra, penalty", [((), 1.0), (("--repetition-penalty", "1.3"), 1.3)])
def test_accuracy_uses_no_repetition_penalty_unless_asked(adapter_run, tmp_path, monkeypatch, extra, penalty):
    """A penalty keeps a model from repeating the digits an answer needs (11 + 11 = 22): accuracy is
    greedy without one unless --repetition-penalty is given; the report says what was used."""
    data, adapter = adapter_run
    used = []
    real = utils.generate_batch

    def spy(model, tokenizer, prompts, settings, *a, **k):
        used.append(settings.repetition_penalty)
        return real(model, tokenizer, prompts, settings, *a, **k)

    monkeypatch.setattr(reasonforge.generation, "generate_batch", spy)
    out = tmp_path / "r.json"
    assert ev.main(["--model-path", str(adapter), "--dataset-path", str(data), "--compute-accuracy", "--generate-samples",
                    "--num-samples", "1", "--max-eval-samples", "2", "--max-new-tokens", "4", "--output-file", str(out),
                    *extra]) == 0
    report = json.loads(out.read_text())
    assert used == [penalty, 1.3 if extra else 1.1]  # accuracy, then samples (the chat default unless given)
    settings = report["metrics"]["accuracy"]["finetuned"]["settings"]
    assert settings["repetition_penalty"] == penalty and settings["temperature"] == 0.0


@pytest.mark.slow
def test_perplexity_matches_independent_computation(adapter_run, tiny_model, tmp_path):
    import datasets
    import torch

    data, adapter = adapter_run
    report_file = tmp_path / "e.json"
    assert ev.main(["--model-path", str(adapter), "--dataset-path", str(data), "--compute-perplexity", "--compare-base",
                    "--max-eval-samples", "5", "--batch-size", "2", "--output-file", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    ppl = report["metrics"]["perplexity"]
    # Independent: one row at a time, plain loops, no batching or padding.
    model, tok, _ = utils.load_model(str(tiny_model), backend="hf", adapter_path=adapter)
    model.eval()
    rows = datasets.load_from_disk(str(data))["validation"].select(range(5))

    def reference(disable):
        nll, count = 0.0, 0
        for messages in rows["messages"]:
            enc = utils.tokenize_for_training(utils.render_chat(messages, template=None, tokenizer=tok), tok)
            ids = torch.tensor([enc["input_ids"]])
            ctx = model.disable_adapter() if disable else torch.no_grad()
            with ctx, torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            for pos in range(1, len(enc["labels"])):
                if enc["labels"][pos] != -100:
                    nll -= logp[pos - 1, enc["labels"][pos]].item()
                    count += 1
        return math.exp(nll / count), count

    tuned, n = reference(False)
    base, _ = reference(True)
    assert ppl["finetuned"]["tokens"] == n and ppl["finetuned"]["samples"] == 5
    assert ppl["finetuned"]["perplexity"] == pytest.approx(tuned, rel=1e-4)
    assert ppl["base"]["perplexity"] == pytest.approx(base, rel=1e-4)
    assert ppl["base"]["perplexity"] != pytest.approx(ppl["finetuned"]["perplexity"], rel=1e-3)  # base pass really differs
    assert ppl["improvement_percent"] == pytest.approx(100 * (base - tuned) / base, rel=1e-3)
    assert report["base_model"] == str(tiny_model) and report["dataset_manifest_sha256"]


@pytest.mark.slow
def test_base_pass_equals_plain_base_model(adapter_run, tiny_model, tmp_path):
    """The adapter-disabled pass gives what the base model alone gives."""
    data, _ = adapter_run
    with_adapter = tmp_path / "a.json"
    base_only = tmp_path / "b.json"
    common = ["--dataset-path", str(data), "--compute-perplexity", "--max-eval-samples", "4"]
    assert ev.main(["--model-path", str(adapter_run[1]), "--compare-base", "--output-file", str(with_adapter), *common]) == 0
    assert ev.main(["--model-path", str(tiny_model), "--output-file", str(base_only), *common]) == 0
    a = json.loads(with_adapter.read_text())["metrics"]["perplexity"]["base"]["perplexity"]
    b = json.loads(base_only.read_text())["metrics"]["perplexity"]["model"]["perplexity"]
    assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.slow
def test_accuracy_and_samples_report(adapter_run, tmp_path):
    data, adapter = adapter_run
    out = tmp_path / "r.json"
    assert ev.main(["--model-path", str(adapter), "--dataset-path", str(data), "--compute-accuracy", "--compare-base",
                    "--generate-samples", "--num-samples", "2", "--max-eval-samples", "3", "--max-new-tokens", "6",
                    "--output-file", str(out)]) == 0
    r = json.loads(out.read_text())
    acc = r["metrics"]["accuracy"]
    for name in ("finetuned", "base"):
        assert acc[name]["total"] == 3 and len(acc[name]["verdicts"]) == 3
        assert acc[name]["accuracy"] == sum(v["correct"] for v in acc[name]["verdicts"]) / 3
    assert len(r["samples"]) == 2 and {"instruction", "ground_truth", "generated"} <= set(r["samples"][0])
    assert r["samples"][0]["ground_truth"].startswith("<think>\n1. ") and "\n</think>\n\nAnswer: " in r["samples"][0]["ground_truth"]
    assert r["versions"]["transformers"] and r["timings"]["model_load_s"] >= 0


def test_batch_output_file(adapter_run, tmp_path):
    _, adapter = adapter_run
    instr = tmp_path / "i.json"
    instr.write_text(json.dumps(["What is 2 + 2?", {"instruction": "Name a colour."}, "Count to three."]))
    out = tmp_path / "inf.json"
    assert tm.main(["--model-path", str(adapter), "--batch", "--instructions-file", str(instr), "--batch-size", "2",
                    "--max-new-tokens", "5", "--temperature", "0", "--output-file", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["count"] == 3 and [x["instruction"] for x in r["results"]] == ["What is 2 + 2?", "Name a colour.", "Count to three."]
    assert all(0 < x["tokens"] <= 5 and x["seconds"] >= 0 and isinstance(x["response"], str) for x in r["results"])
    assert not (tmp_path / "inf.json.partial.jsonl").exists()


def test_batched_greedy_equals_one_at_a_time(adapter_run, tiny_model):
    """Left padding must not change greedy outputs."""
    _, adapter = adapter_run
    model, tok, _ = utils.load_model(str(tiny_model), backend="hf", adapter_path=adapter)
    model.eval()
    convs = [[{"role": "user", "content": q}] for q in ("Hi", "What is the capital of France and why?", "2+2?")]
    greedy = utils.GenerationSettings(temperature=0, max_new_tokens=6, repetition_penalty=1.0)
    batched = utils.generate_batch(model, tok, convs, greedy, batch_size=3, desc=None)
    single = [utils.generate_batch(model, tok, [c], greedy, batch_size=1, desc=None)[0] for c in convs]
    assert [b["response"] for b in batched] == [s["response"] for s in single]


def test_batch_resumes_without_redoing(adapter_run, tmp_path, monkeypatch):
    _, adapter = adapter_run
    instr = tmp_path / "i.json"
    instr.write_text(json.dumps([f"question {i}" for i in range(4)]))
    out = tmp_path / "inf.json"
    partial = tmp_path / "inf.json.partial.jsonl"
    partial.write_text(json.dumps({"index": 1, "instruction": "question 1", "response": "KEPT", "tokens": 1, "seconds": 0.1})
                       + "\n{\"index\": 2, \"instr")  # second line cut off by the interruption
    seen = []
    original = utils.generate_batch

    def spy(model, tok, convs, *a, **k):
        seen.extend(c[-1]["content"] for c in convs)
        return original(model, tok, convs, *a, **k)

    monkeypatch.setattr(reasonforge.generation, "generate_batch", spy)
    assert tm.main(["--model-path", str(adapter), "--batch", "--instructions-file", str(instr), "--max-new-tokens", "3",
                    "--output-file", str(out)]) == 0
    assert sorted(seen) == ["question 0", "question 2", "question 3"]
    results = json.loads(out.read_text())["results"]
    assert results[1]["response"] == "KEPT" and [r["index"] for r in results] == [0, 1, 2, 3]


def test_batch_resume_with_other_settings_is_refused_before_the_model_loads(adapter_run, tmp_path, monkeypatch, capsys):
    """A batch killed midway and resumed with another model or temperature would mix two runs'
    answers in one report under the second run's header."""
    _, adapter = adapter_run
    instr = tmp_path / "i.json"
    instr.write_text(json.dumps([f"question {i}" for i in range(3)]))
    out = tmp_path / "inf.json"
    first = ["--model-path", str(adapter), "--batch", "--instructions-file", str(instr), "--max-new-tokens", "3",
             "--temperature", "0", "--batch-size", "1", "--output-file", str(out)]
    original = utils.generate_batch
    calls = []

    def killed_after_one(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*a, **k)

    monkeypatch.setattr(reasonforge.generation, "generate_batch", killed_after_one)
    assert tm.main(first) == 130
    partial = tmp_path / "inf.json.partial.jsonl"
    lines = [json.loads(line) for line in partial.read_text().splitlines()]
    assert "batch_of" in lines[0] and [r["index"] for r in lines[1:]] == [0]
    monkeypatch.setattr(reasonforge.generation, "generate_batch", original)
    loaded = []
    monkeypatch.setattr(utils, "load_for_inference", lambda args: loaded.append(1) or 1 / 0)
    capsys.readouterr()
    assert tm.main([*first[:-4], "--temperature", "0.9", "--output-file", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "holds 1 answers of an interrupted batch" in err and "temperature 0.0 there, 0.9 here" in err
    assert not loaded and partial.read_text().splitlines()[1:] == [json.dumps(lines[1], ensure_ascii=False)]
    other_file = tmp_path / "other.json"
    other_file.write_text(json.dumps(["another question"]))
    assert tm.main([*first[:3], "--instructions-file", str(other_file), *first[5:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds 1 answers to instructions that are not at those places" in err and len(partial.read_text().splitlines()) == 2
    monkeypatch.undo()
    assert tm.main(first) == 0  # the same settings resume it
    results = json.loads(out.read_text())["results"]
    assert results[0] == {k: v for k, v in lines[1].items()} and [r["index"] for r in results] == [0, 1, 2]


@pytest.mark.slow
def test_chat_and_one_instruction_never_replace_a_batch_report(adapter_run, tmp_path, capsys):
    _, adapter = adapter_run
    instr = tmp_path / "i.json"
    instr.write_text(json.dumps(["What is 2 + 2?", {"instruction": "How many apples?", "input": "Maya has 8 and gets 7."}]))
    out = tmp_path / "inf.json"
    assert tm.main(["--model-path", str(adapter), "--batch", "--instructions-file", str(instr), "--max-new-tokens", "2",
                    "--output-file", str(out)]) == 0
    report = out.read_text()
    assert json.loads(report)["mode"] == "batch"
    # an Alpaca "input" is part of the prompt, joined as training data joins it
    assert json.loads(report)["results"][1]["instruction"] == "How many apples?\n\nMaya has 8 and gets 7."
    for mode in (["--instruction", "hi"], ["--interactive"]):
        capsys.readouterr()
        assert tm.main(["--model-path", str(adapter), *mode, "--output-file", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and "holds a batch report (2 answers)" in err and "pass another --output-file" in err
    assert out.read_text() == report
    # a report of one instruction is replaced by the next, as before
    single = tmp_path / "one.json"
    for text in ("hi", "hello"):
        assert tm.main(["--model-path", str(adapter), "--instruction", text, "--max-new-tokens", "2",
                        "--output-file", str(single)]) == 0
    assert json.loads(single.read_text())["results"][0]["instruction"] == "hello"


def spawn_chat(adapter, tmp_path, *extra):
    import pexpect

    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return pexpect.spawn(sys.executable, [str(ROOT / "test_model.py"), "--model-path", str(adapter), "--interactive",
                                          "--output-file", str(tmp_path / "chat.json"), *extra],
                         env=env, encoding="utf-8", timeout=120)


@pytest.mark.slow
def test_interactive_through_a_pty(adapter_run, tmp_path):
    """Drive the chat in a pseudo-terminal: settings NAME VALUE (bad and good), two turns, reset, quit."""
    import pexpect

    _, adapter = adapter_run
    child = spawn_chat(adapter, tmp_path, "--max-new-tokens", "4")
    child.expect("you> ")
    child.sendline("settings top_p 0.8")
    child.expect(r"temperature=0\.7, top_p=0\.8.*repetition_penalty=1\.1")
    child.sendline("settings top_p 7")
    child.expect("refused: top_p 7.0 must be in")
    child.expect("you> ")
    child.sendline("settings temperature 0")
    child.expect(r"temperature=0\.0")
    child.sendline("first question")
    child.expect("assistant> ")
    child.expect("you> ")
    child.sendline("second question")
    child.expect("you> ")
    child.sendline("reset")
    child.expect("conversation cleared")
    child.sendline("quit")
    child.expect("bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    turns = json.loads((tmp_path / "chat.json").read_text())["results"]
    assert [t["instruction"] for t in turns] == ["first question", "second question"]
    assert json.loads((tmp_path / "chat.json").read_text())["generation"]["temperature"] == 0.0


@pytest.mark.slow
def test_settings_dialog_as_the_seed_shows_it(adapter_run, tmp_path):
    """The seed's `settings` dialog in a pseudo-terminal; its values drive the next reply, no library
    warning lands inside that reply, Ctrl-C stops a reply but not the session, Ctrl-D cancels."""
    import pexpect

    _, trained = adapter_run
    # Saved with clean_up_tokenization_spaces on, as the GGUF demo export was: transformers then
    # warned in the middle of the first streamed reply.
    adapter = tmp_path / "adapter"
    shutil.copytree(trained, adapter)
    config = json.loads((adapter / "tokenizer_config.json").read_text())
    (adapter / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    child = spawn_chat(adapter, tmp_path)
    child.expect(r"\(transcript: (\S+\.jsonl)\)")
    transcript = Path(child.match.group(1))
    child.expect("you> ")
    child.sendline("settings")
    child.expect_exact("New max_new_tokens [512]: ")
    child.sendline("256")
    child.expect_exact("New temperature [0.7]: ")
    child.sendline("hot")
    child.expect_exact("refused: temperature must be a number, got 'hot'")
    child.expect_exact("New temperature [0.7]: ")
    child.sendline("0")
    child.expect_exact("Settings updated: max_new_tokens=256, temperature=0.0")
    child.expect("you> ")
    child.sendline("What is 2 + 2?")
    child.expect_exact("assistant> ")
    child.expect("you> ")
    reply = child.before
    for noise in ("ignoring", "warning", "warn", "[transformers]"):
        assert noise not in reply.lower(), reply

    child.sendline("settings max_new_tokens 1500")
    child.expect("you> ")
    child.sendline("Count to one thousand.")
    child.expect_exact("assistant> ")
    child.expect(r"\S")  # the reply has started
    child.sendintr()
    child.expect_exact("[reply stopped; it is left out of the conversation]")
    child.expect("you> ")
    child.sendline("settings")
    child.expect_exact("New max_new_tokens [1500]: ")
    child.sendeof()
    child.expect_exact("settings unchanged")
    child.expect("you> ")
    child.sendline("quit")
    child.expect_exact(f"bye (transcript: {transcript})")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    records = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert records[0]["type"] == "session" and records[0]["model_path"] == str(adapter)
    first, stopped = [r for r in records if r["type"] == "turn"]
    assert first["instruction"] == "What is 2 + 2?" and not first["interrupted"]
    assert first["generation"]["max_new_tokens"] == 256 and first["generation"]["temperature"] == 0.0
    assert 0 < first["tokens"] <= 256
    assert stopped["interrupted"] and 0 < stopped["tokens"] < 1500 and stopped["generation"]["max_new_tokens"] == 1500


def test_settings_dialog_keeps_refuses_and_cancels(capsys):
    answers = iter(["", "9", "0.2"])
    new, shown = chat.settings_dialog(utils.GenerationSettings(), ask=lambda prompt: next(answers))
    assert (new.max_new_tokens, new.temperature) == (512, 0.2)
    assert shown == "Settings updated: max_new_tokens=512, temperature=0.2"
    assert "refused: temperature 9.0 must be between 0 (greedy) and 5" in capsys.readouterr().out

    def ctrl_d(prompt):
        raise EOFError

    same, shown = chat.settings_dialog(new, ask=ctrl_d)
    assert same is new and shown.strip() == "settings unchanged"


def test_ctrl_c_stops_the_reply_not_the_session(monkeypatch, capsys):
    seen = []

    def reply(model, tok, messages, settings, engine="static"):
        seen.append([m["content"] for m in messages])
        if len(seen) == 2:
            raise chat.ReplyInterrupted({"response": "half a", "tokens": 2, "seconds": 0.1})
        return {"response": f"r{len(seen)}", "tokens": 1, "seconds": 0.0}

    lines = iter(["one", "two", "three"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(chat, "stream_reply", reply)
    monkeypatch.setattr("builtins.input", fake_input)
    turns, _ = chat.interactive(None, None, utils.GenerationSettings(), None)
    assert seen[2] == ["one", "r1", "three"]  # the stopped reply is not in the history
    assert turns[1] == {"instruction": "two", "response": "half a", "tokens": 2, "seconds": 0.1, "interrupted": True,
                        "generation": utils.GenerationSettings().as_dict()}
    assert "[reply stopped" in capsys.readouterr().out


def test_chat_transcript_records_each_turn(adapter_run, tmp_path, monkeypatch, capsys):
    _, adapter = adapter_run
    out_dir = tmp_path / "results"
    script = iter(["first question", "settings temperature 0", "second question", "reset", "quit"])
    written_before_second = []

    def fake_input(prompt=""):
        line = next(script)
        if line == "second question":  # the first turn must already be on disk
            written_before_second.extend(next(out_dir.glob("chat_*.jsonl")).read_text().splitlines())
        return line

    monkeypatch.setattr("builtins.input", fake_input)
    assert tm.main(["--model-path", str(adapter), "--interactive", "--max-new-tokens", "3", "--system-prompt", "Be brief.",
                    "--output-file", str(out_dir / "chat.json")]) == 0
    files = list(out_dir.glob("chat_*.jsonl"))
    assert len(files) == 1 and capsys.readouterr().out.count(f"(transcript: {files[0]})") == 2  # at start and at bye
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert len(written_before_second) == 2
    assert [r["type"] for r in records] == ["session", "turn", "turn", "reset"]
    session, first, second = records[:3]
    assert session["model_path"] == str(adapter) and session["system_prompt"] == "Be brief." and session["base_model"]
    assert [first["instruction"], second["instruction"]] == ["first question", "second question"]
    assert first["generation"]["temperature"] == 0.7 and second["generation"]["temperature"] == 0.0
    report = json.loads((out_dir / "chat.json").read_text())
    # the settings changed mid-chat: no single set describes the report, each result keeps its own
    assert report["mode"] == "chat" and report["generation"] is None
    assert [r["generation"]["temperature"] for r in report["results"]] == [0.7, 0.0]
    for turn in (first, second):
        assert isinstance(turn["response"], str) and 0 < turn["tokens"] <= 3 and turn["seconds"] >= 0


def test_chat_history_is_kept_across_turns(adapter_run, tiny_model, monkeypatch, capsys):
    _, adapter = adapter_run
    model, tok, _ = utils.load_model(str(tiny_model), backend="hf", adapter_path=adapter)
    seen = []
    monkeypatch.setattr(chat, "stream_reply", lambda m, t, msgs, s, engine="static": seen.append(msgs) or {"response": f"r{len(seen)}", "tokens": 1, "seconds": 0})
    lines = iter(["one", "two", "reset", "three"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None  # Ctrl-D

    monkeypatch.setattr("builtins.input", fake_input)
    turns, _ = chat.interactive(model, tok, utils.GenerationSettings(), "SYS")
    assert [t["instruction"] for t in turns] == ["one", "two", "three"]
    assert [m["content"] for m in seen[1]] == ["SYS", "one", "r1", "two"]
    assert [m["content"] for m in seen[2]] == ["SYS", "three"]  # reset cleared the history; Ctrl-D ended the loop


BAD_EVAL = [
    (["--model-path", "{tmp}/none"], "does not exist"),
    (["--model-path", "{noweights}", "--is-adapter"], "no adapter_model.safetensors"),
    (["--model-path", "{plain}", "--is-adapter"], "has no adapter_config.json"),
    (["--top-p", "0"], "--top-p 0.0 must be in (0, 1]"),
    (["--compute-accuracy", "--dataset-path", "{noanswers}"], "no rows of split 'validation' have a reference answer"),
    (["--split", "test"], "split 'test' not in"),
]


@pytest.mark.parametrize("extra,message", BAD_EVAL)
def test_evaluate_bad_input(adapter_run, tmp_path, capsys, extra, message):
    data, adapter = adapter_run
    files = {"tmp": tmp_path, "noweights": tmp_path / "nw", "plain": tmp_path / "plain", "noanswers": tmp_path / "na"}
    files["noweights"].mkdir()
    (files["noweights"] / "adapter_config.json").write_text("{}")
    files["plain"].mkdir()
    (files["plain"] / "config.json").write_text("{}")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(10)))
    assert dp.main(["--dataset", str(rows), "--skip-upload", "--output-dir", str(files["noanswers"])]) == 0
    argv = ["--model-path", str(adapter), "--dataset-path", str(data), "--output-file", str(tmp_path / "o.json")]
    argv += [e.format(**files) for e in extra]
    capsys.readouterr()
    assert ev.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err[-2:]
    assert not (tmp_path / "o.json").exists()


def test_mismatched_base_model(adapter_run, tmp_path, capsys):
    from conftest import build_tiny_qwen
    from transformers import Qwen2Config

    other = tmp_path / "other"
    build_tiny_qwen(other)
    cfg = json.loads((other / "config.json").read_text())
    _, adapter = adapter_run
    # Same architecture, other width: the adapter's matrices cannot fit.
    from transformers import Qwen2ForCausalLM

    wide = Qwen2ForCausalLM(Qwen2Config(**{**{k: v for k, v in cfg.items() if k in Qwen2Config().to_dict()},
                                          "hidden_size": 48, "intermediate_size": 96}))
    wide.save_pretrained(str(other))
    assert tm.main(["--model-path", str(adapter), "--base-model", str(other), "--instruction", "hi",
                    "--output-file", str(tmp_path / "o.json")]) == 2
    assert "does not fit base model" in capsys.readouterr().err


def test_an_adapter_on_a_shallower_base_is_refused(adapter_run, tmp_path, capsys):
    """Same width, fewer layers: PEFT drops the deeper layers' weights without a word."""
    from conftest import build_tiny_qwen
    from transformers import Qwen2Config, Qwen2ForCausalLM

    other = tmp_path / "shallow"
    build_tiny_qwen(other)
    cfg = json.loads((other / "config.json").read_text())
    _, adapter = adapter_run
    layers = cfg["num_hidden_layers"]
    assert layers > 1
    kept = {k: v for k, v in cfg.items() if k in Qwen2Config().to_dict() and k != "layer_types"}
    Qwen2ForCausalLM(Qwen2Config(**{**kept, "num_hidden_layers": layers - 1})).save_pretrained(str(other))
    assert tm.main(["--model-path", str(adapter), "--base-model", str(other), "--instruction", "hi",
                    "--output-file", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"has LoRA weights for decoder layer {layers - 1}, but base model" in err and f"has {layers - 1} layers" in err


BAD_CHAT = [
    (["--batch", "--instructions-file", "{notlist}"], "must hold a JSON list, found a dict"),
    (["--batch", "--instructions-file", "{badentry}"], "entry 1 is not a non-empty string"),
    (["--batch", "--instructions-file", "{broken}"], "is not valid JSON (line 2"),
    (["--batch"], "--batch needs --instructions-file"),
    (["--instruction", "x", "--interactive"], "choose exactly one of"),
    (["--batch", "--instructions-file", "{good}", "--instruction", "x"], "--instruction and --batch are separate modes; choose exactly one of"),
    (["--instruction", "x", "--instructions-file", "{good}"], "--instruction and --instructions-file conflict"),
    (["--interactive", "--instructions-file", "{good}"], "--interactive and --instructions-file conflict"),
    (["--batch", "--instructions-file", "{dupkey}"], "instructions file {dupkey}: entry 1 has the key 'instruction' twice; keep one"),
    (["--batch", "--instructions-file", "{latin}"], "instructions file {latin} is not UTF-8 (byte 0xe9 at byte offset 5); save it as UTF-8"),
    (["--instruction", "x", "--temperature", "-1"], "--temperature -1.0 must be between 0"),
    (["--instruction", "x", "--temperature", "1e-300"], "--temperature 1e-300 must be between 0 (greedy) and 5, and 0 or at least 0.0001"),
    (["--instruction", "x", "--max-new-tokens", "0"], "--max-new-tokens 0 must be between 1"),
]


@pytest.mark.parametrize("extra,message", BAD_CHAT)
def test_chat_bad_input(adapter_run, tmp_path, capsys, extra, message):
    _, adapter = adapter_run
    files = {"notlist": tmp_path / "a.json", "badentry": tmp_path / "b.json", "broken": tmp_path / "c.json",
             "good": tmp_path / "d.json", "dupkey": tmp_path / "e.json", "latin": tmp_path / "f.json"}
    files["notlist"].write_text('{"instruction": "x"}')
    files["good"].write_text('["a question"]')
    files["dupkey"].write_text('["ok", {"instruction": "x", "instruction": "y"}]')  # a JSON reader keeps "y" silently
    files["latin"].write_bytes(b'["caf\xe9"]')
    files["badentry"].write_text('["ok", {"prompt": "wrong key"}]')
    files["broken"].write_text('[\n"a",,\n]')
    argv = ["--model-path", str(adapter), "--output-file", str(tmp_path / "o.json")] + [e.format(**files) for e in extra]
    assert tm.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message.format(**files) in err[-1], err[-2:]
    assert len(err) == 1


def test_a_batch_into_an_output_file_another_batch_is_writing_is_refused(adapter_run, tmp_path, monkeypatch, capsys):
    """Two batches into one --output-file: the later one's report would replace the other's answers."""
    import socket
    import subprocess

    _, adapter = adapter_run
    instr = tmp_path / "i.json"
    instr.write_text(json.dumps(["question 0", "question 1"]))
    out = tmp_path / "inf.json"
    lock = tmp_path / "inf.json.lock"
    argv = ["--model-path", str(adapter), "--batch", "--instructions-file", str(instr), "--max-new-tokens", "2",
            "--output-file", str(out)]
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "hostname": socket.gethostname(), "started": "2026-01-01T00:00:00Z"}))
        original_load = utils.load_for_inference
        monkeypatch.setattr(utils, "load_for_inference", lambda args: 1 / 0)
        assert tm.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --output-file {out} is in use by another run (pid {holder.pid} on ")
        assert "wait for it to finish or choose another --output-file" in err[0] and f"delete {lock}" in err[0]
        assert lock.exists() and not out.exists() and not batch.partial_path(out).exists()
        # a single instruction into the running batch's file would replace its report as well
        assert tm.main(["--model-path", str(adapter), "--instruction", "hi", "--output-file", str(out)]) == 2
        assert f"--output-file {out} is in use by another run" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.setattr(utils, "load_for_inference", original_load)
    # the holder is gone: its lock is taken over; while the batch runs, the lock is ours, and it goes at the end
    holders = []
    original = utils.generate_batch
    monkeypatch.setattr(reasonforge.generation, "generate_batch",
                        lambda *a, **k: holders.append(json.loads(lock.read_text())["pid"]) or original(*a, **k))
    assert tm.main(argv) == 0
    assert holders and set(holders) == {os.getpid()} and not lock.exists()
    # a finished report is ours: a new batch with other settings replaces it (and a resume still resumes)
    assert tm.main([*argv, "--temperature", "0"]) == 0
    assert json.loads(out.read_text())["generation"]["temperature"] == 0.0 and not lock.exists()


def test_ctrl_c_at_the_chat_prompt_saves_the_chat_so_far(adapter_run, tmp_path, monkeypatch, capsys):
    _, adapter = adapter_run
    out = tmp_path / "results" / "chat.json"
    lines = iter(["first question"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise KeyboardInterrupt from None  # Ctrl-C at the prompt, not during a reply

    monkeypatch.setattr("builtins.input", fake_input)
    assert tm.main(["--model-path", str(adapter), "--interactive", "--max-new-tokens", "2", "--output-file", str(out)]) == 130
    transcript = next(out.parent.glob("chat_*.jsonl"))
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"interrupted; the chat so far is saved in {out.resolve()} (transcript: {transcript})"
    report = json.loads(out.read_text())
    assert report["mode"] == "chat" and [r["instruction"] for r in report["results"]] == ["first question"]


@pytest.mark.slow
@pytest.mark.s3
def test_s3_model_and_dataset_paths(adapter_run, s3_env, tmp_path, monkeypatch):
    data, adapter = adapter_run
    monkeypatch.chdir(tmp_path)
    utils.upload_directory(adapter, utils.S3Uri(s3_env, "adapters/r/final_model"), progress=False)
    utils.upload_directory(data, utils.S3Uri(s3_env, "datasets/d"), progress=False)
    out = tmp_path / "e.json"
    assert ev.main(["--model-path", f"s3://{s3_env}/adapters/r/final_model", "--dataset-path", f"s3://{s3_env}/datasets/d",
                    "--compute-perplexity", "--max-eval-samples", "3", "--output-file", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"]["perplexity"]["finetuned"]["samples"] == 3
    assert tm.main(["--model-path", f"s3://{s3_env}/adapters/r/final_model", "--instruction", "hi", "--max-new-tokens", "3",
                    "--output-file", str(tmp_path / "c.json")]) == 0


@pytest.mark.gpu
def test_unsloth_evaluate_and_chat(tmp_path, sample_dataset):
    model = os.environ.get("RF_GPU_TEST_MODEL")
    if not model:
        pytest.skip("set RF_GPU_TEST_MODEL to a local Qwen folder")
    run = tmp_path / "run"
    assert train_lora.main(["--model-name", model, "--dataset-path", str(sample_dataset), "--output-dir", str(run),
                            "--max-steps", "4", "--save-steps", "4", "--backend", "unsloth"]) == 0
    out = tmp_path / "e.json"
    assert ev.main(["--model-path", str(run / "final_model"), "--dataset-path", str(sample_dataset), "--backend", "unsloth",
                    "--compute-perplexity", "--compare-base", "--compute-accuracy", "--max-eval-samples", "8",
                    "--max-new-tokens", "32", "--output-file", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["backend"] == "unsloth" and math.isfinite(r["metrics"]["perplexity"]["finetuned"]["perplexity"])
    assert r["metrics"]["perplexity"]["base"]["perplexity"] != r["metrics"]["perplexity"]["finetuned"]["perplexity"]
    instr = tmp_path / "i.json"
    instr.write_text(json.dumps([f"What is {i} + {i}?" for i in range(16)]))
    assert tm.main(["--model-path", str(run / "final_model"), "--backend", "unsloth", "--batch", "--instructions-file",
                    str(instr), "--max-new-tokens", "32", "--output-file", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["count"] == 16


def test_a_mistyped_relative_model_path_says_it_does_not_exist(adapter_run, tmp_path, monkeypatch, capsys):
    """A Hub id has at most one '/': 'run/checkpoints/nope' is a folder that is not there, not a Hub
    id to look up (which offline ended in a Hub error naming no folder)."""
    from reasonforge.core import path_kind

    assert path_kind("Qwen/Qwen2.5-3B-Instruct") == "hub" and path_kind("run/checkpoints/nope") == "local"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert tm.main(["--model-path", "run/checkpoints/nope", "--instruction", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "does not exist" in err and "run/checkpoints/nope" in err


@pytest.mark.slow
def test_rows_the_adapter_trained_on_are_counted_and_warned(adapter_run, tmp_path, capsys):
    """The same source prepared with another --seed splits differently: most of its validation
    prompts were training prompts of the adapter, and their scores would pass for generalisation."""
    import datasets

    from reasonforge.conversations import prompt_key

    data, adapter = adapter_run
    other = tmp_path / "reseeded"
    assert dp.main(["--dataset", "sample", "--max-samples", "60", "--seed", "7", "--skip-upload",
                    "--output-dir", str(other)]) == 0
    trained = {prompt_key(m) for m in datasets.load_from_disk(str(data))["train"]["messages"]}
    val = datasets.load_from_disk(str(other))["validation"]["messages"]
    expected = sum(prompt_key(m) in trained for m in val)
    assert 0 < expected  # the check below would pass vacuously otherwise
    out = tmp_path / "e.json"
    capsys.readouterr()
    assert ev.main(["--model-path", str(adapter), "--dataset-path", str(other), "--compute-perplexity",
                    "--output-file", str(out)]) == 0
    check = json.loads(out.read_text())["trained_rows_check"]
    assert check["rows_seen_in_training"] == expected and check["of"] == len(val) and not check["same_dataset_as_training"]
    printed = capsys.readouterr().out
    assert f"warning: {expected} of the {len(val)} rows evaluated have a prompt the adapter trained on" in printed
    # the training folder prepared again in place: its rows are no longer the ones trained on, so
    # comparing with them would report 0 seen; the check says it cannot tell instead
    info = json.loads((adapter / "reasonforge.json").read_text())
    assert Path(info["dataset_path"]).is_absolute() and Path(info["base_model"]).is_absolute()
    moved = tmp_path / "adapter"
    shutil.copytree(adapter, moved)
    replaced = tmp_path / "replaced"
    shutil.copytree(other, replaced)
    (moved / "reasonforge.json").write_text(json.dumps({**info, "dataset_path": str(replaced)}))
    assert ev.main(["--model-path", str(moved), "--dataset-path", str(other), "--compute-perplexity",
                    "--max-eval-samples", "2", "--output-file", str(out)]) == 0
    check = json.loads(out.read_text())["trained_rows_check"]
    assert check["rows_seen_in_training"] is None and "prepared again since" in check["warning"]
    # its own validation split: nothing seen, no warning; its train split: all of it, warned
    for split, seen in (("validation", 0), ("train", None)):
        assert ev.main(["--model-path", str(adapter), "--dataset-path", str(data), "--split", split,
                        "--compute-perplexity", "--max-eval-samples", "4", "--output-file", str(out)]) == 0
        check = json.loads(out.read_text())["trained_rows_check"]
        assert check["same_dataset_as_training"] and check["rows_seen_in_training"] == (4 if seen is None else 0)
        assert ("warning" in check) == (seen is None)


def test_a_reference_of_zero_is_scored(adapter_run, tmp_path):
    """Parquet or mixed JSON keep a numeric answer column: 0 (or False) is a reference, not a missing one."""
    import datasets

    data, adapter = adapter_run
    dd = datasets.load_from_disk(str(data))
    typed = tmp_path / "typed"
    dd = datasets.DatasetDict({name: split.remove_columns("answer").add_column("answer", [0] * len(split))
                               for name, split in dd.items()})
    dd.save_to_disk(str(typed))
    shutil.copy(data / "manifest.json", typed / "manifest.json")
    out = tmp_path / "e.json"
    assert ev.main(["--model-path", str(adapter), "--dataset-path", str(typed), "--compute-accuracy",
                    "--max-eval-samples", "3", "--max-new-tokens", "2", "--output-file", str(out)]) == 0
    acc = json.loads(out.read_text())["metrics"]["accuracy"]["finetuned"]
    assert acc["total"] == 3 and [v["reference"] for v in acc["verdicts"]] == ["0"] * 3


def test_the_weights_stamp_follows_the_values_not_the_copy(adapter_run, tmp_path):
    """A batch resumed on a new instance reads the adapter copied again (new mtimes): same stamp;
    a retrained adapter saved to the same folder: another stamp."""
    import os

    _, adapter = adapter_run
    copy = tmp_path / "copy"
    shutil.copytree(adapter, copy)
    weights = copy / "adapter_model.safetensors"
    os.utime(weights, ns=(1, 1))
    assert batch.weights_stamp(str(copy)) == batch.weights_stamp(str(adapter)) is not None
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one value changed, same size
    weights.write_bytes(bytes(data))
    assert batch.weights_stamp(str(copy)) != batch.weights_stamp(str(adapter))


def test_an_instructions_file_with_a_byte_order_mark_is_read(tmp_path):
    file = tmp_path / "i.json"
    file.write_bytes(b"\xef\xbb\xbf" + json.dumps(["one", "two"]).encode())
    assert batch.read_instructions(str(file)) == ["one", "two"]


def test_a_run_folder_without_a_dataset_flag_names_its_final_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data_cache here: the model path must be named first
    run = tmp_path / "run"
    (run / "final_model").mkdir(parents=True)
    (run / "final_model" / "adapter_config.json").write_text("{}")
    assert ev.main(["--model-path", str(run), "--output-file", str(tmp_path / "e.json")]) == 2
    assert f"for the run's model pass {run / 'final_model'}" in capsys.readouterr().err
