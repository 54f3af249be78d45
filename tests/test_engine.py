"""reasonforge.engine against transformers' generate: the same greedy tokens, stops, settings and
adapter state, on the tiny random Qwen, the real SmolLM2 chat model, and (GPU) a 4-bit model with
LoRA whose decode step is replayed as a CUDA graph."""

from __future__ import annotations

import json
import random

import pytest

import evaluate_model
import test_model as tm
import train_lora
import utils
from reasonforge import chat, generation
from reasonforge import engine as engine_mod
from reasonforge.core import UserError

WORDS = ["What", "is", "12", "times", "7", "apple", "train", "how", "many", "minutes", "Explain", "why", "sky", "blue"]


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    return [[{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 25)))}]
            for _ in range(n)]


def load(path):
    model, tok, _ = utils.load_model(str(path), backend="hf")
    model.eval()
    return model, tok


def both_engines(model, tok, convs, settings, batch_size):
    old = utils.generate_batch(model, tok, convs, settings, batch_size, desc=None, engine="generate")
    new = utils.generate_batch(model, tok, convs, settings, batch_size, desc=None, engine="static")
    return old, new


def same_replies(old: list[dict], new: list[dict]) -> int:
    return sum((a["response"], a["tokens"], a["stopped"]) == (b["response"], b["tokens"], b["stopped"])
               for a, b in zip(old, new))


@pytest.mark.parametrize("penalty,batch_size", [(1.0, 4), (1.1, 3)])
def test_greedy_replies_equal_generate_on_the_tiny_qwen(tiny_model, penalty, batch_size):
    model, tok = load(tiny_model)
    convs = conversations(7)
    settings = utils.GenerationSettings(temperature=0, max_new_tokens=24, repetition_penalty=penalty)
    old, new = both_engines(model, tok, convs, settings, batch_size)
    assert same_replies(old, new) == len(convs), [(a["response"], b["response"]) for a, b in zip(old, new)]
    assert all(r["tokens"] == 24 and not r["stopped"] for r in new)  # random weights never stop: every step is compared


@pytest.mark.slow
def test_greedy_replies_equal_generate_on_smollm2(demo_model):
    """The real chat model: replies that stop at <|im_end|> at different lengths within a batch."""
    model, tok = load(demo_model)
    convs = conversations(12, seed=3)
    settings = utils.GenerationSettings(temperature=0, max_new_tokens=64, repetition_penalty=1.0)
    old, new = both_engines(model, tok, convs, settings, 4)
    assert same_replies(old, new) == len(convs)
    assert any(r["stopped"] for r in new) and any(not r["stopped"] for r in new)
    assert len({r["tokens"] for r in new}) >= 3  # rows of a batch stop at different steps


def test_adapter_state_gets_its_own_slot_and_replies(tiny_model):
    """With the adapter switched off (evaluation's base pass) the engine must not reuse the slot of
    the adapter's path; each state's replies equal generate's in that state, and they differ."""
    import torch
    from peft import LoraConfig, get_peft_model

    base, tok = load(tiny_model)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1.0)
    model.eval()
    convs = conversations(4, seed=5)
    settings = utils.GenerationSettings(temperature=0, max_new_tokens=16, repetition_penalty=1.0)
    tuned_old, tuned_new = both_engines(model, tok, convs, settings, 4)
    with model.disable_adapter():
        base_old, base_new = both_engines(model, tok, convs, settings, 4)
    assert same_replies(tuned_old, tuned_new) == 4 and same_replies(base_old, base_new) == 4
    assert [r["response"] for r in tuned_new] != [r["response"] for r in base_new]


def test_stops_include_the_stop_token_for_grpo_and_respect_max_new_tokens(tiny_model):
    """A reply ends at the first stop id; Reply.stop_id keeps it (TRL's completions include it)."""
    model, tok = load(tiny_model)
    prompt = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    settings = utils.GenerationSettings(temperature=0, max_new_tokens=12, repetition_penalty=1.0)
    free = engine_mod.Engine(model, tok.pad_token_id).generate([prompt], settings, {-1})[0]
    assert not free.stopped and len(free.ids) == 12 and free.stop_id is None
    stop = free.ids[5]  # the sixth greedy token becomes a stop id: the reply must end just before it
    first = free.ids.index(stop)
    cut = engine_mod.Engine(model, tok.pad_token_id).generate([prompt], settings, {stop})[0]
    assert cut.stopped and cut.ids == free.ids[:first] and cut.stop_id == stop


def test_sampling_follows_the_seed_and_the_settings(tiny_model):
    import torch

    model, tok = load(tiny_model)
    convs = conversations(3, seed=9)
    settings = utils.GenerationSettings(temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=10, repetition_penalty=1.1)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append([r["response"] for r in utils.generate_batch(model, tok, convs, settings, 3, desc=None,
                                                                  engine="static")])
    assert runs[0] == runs[1]
    procs = generation.logits_processors(settings)
    assert [type(p).__name__ for p in procs] == ["RepetitionPenaltyLogitsProcessor", "TemperatureLogitsWarper",
                                                 "TopKLogitsWarper", "TopPLogitsWarper"]
    assert generation.logits_processors(utils.GenerationSettings(temperature=0, repetition_penalty=1.0)) is None


def test_batch_plan_fills_free_memory_within_limits():
    per_token = 36 * 2 * 2 * 128 * 2  # the Qwen2.5-3B shape: 36 layers, K and V, 2 KV heads of 128, bf16
    assert engine_mod.rows_that_fit(4 * 1024**3, per_token, 768, rows=500) == 91  # 0.6 x 4 GiB / 27 MiB a row
    assert engine_mod.rows_that_fit(80 * 1024**3, per_token, 768, rows=500) == engine_mod.MAX_BATCH
    assert engine_mod.rows_that_fit(80 * 1024**3, per_token, 768, rows=64) == 64
    assert engine_mod.rows_that_fit(1024**2, per_token, 768, rows=64) == 1
    assert engine_mod.plan_batch_size(None, 100, 512, requested=16) == (16, "--batch-size")


def test_engine_choice():
    assert utils.resolve_engine("generate", "auto") == ("generate", "auto")
    assert utils.resolve_engine("static", "auto") == ("static", "hf")
    assert utils.resolve_engine("auto", "unsloth") == ("generate", "unsloth")
    assert utils.resolve_engine("auto", "auto") == ("generate", "auto")  # no CUDA here: nothing to replay
    with pytest.raises(UserError, match="--engine static"):
        utils.resolve_engine("static", "unsloth")


@pytest.mark.slow
def test_cli_reports_agree_across_engines(tiny_model, sample_dataset, tmp_path):
    """evaluate_model.py and test_model.py give the same greedy answers with either engine, and
    their reports say which engine ran and how fast."""
    verdicts = {}
    for engine in ("generate", "static"):
        report = tmp_path / f"eval_{engine}.json"
        assert evaluate_model.main(["--model-path", str(tiny_model), "--dataset-path", str(sample_dataset),
                                    "--compute-accuracy", "--max-eval-samples", "6", "--max-new-tokens", "12",
                                    "--engine", engine, "--output-file", str(report)]) == 0
        data = json.loads(report.read_text())
        assert data["engine"] == engine
        acc = data["metrics"]["accuracy"]["model"]
        assert acc["generation_speed"]["engine"] == engine and acc["generation_speed"]["tokens_per_s"] > 0
        verdicts[engine] = [(v["response"], v["correct"]) for v in acc["verdicts"]]
    assert verdicts["generate"] == verdicts["static"]
    answers = {}
    instructions = tmp_path / "i.json"
    instructions.write_text(json.dumps(["Hello", "What is 2 + 2?", "Name a colour.", "Count to three."]))
    for engine in ("generate", "static"):
        out = tmp_path / f"batch_{engine}.json"
        assert tm.main(["--model-path", str(tiny_model), "--batch", "--instructions-file", str(instructions),
                        "--temperature", "0", "--max-new-tokens", "10", "--engine", engine,
                        "--output-file", str(out)]) == 0
        data = json.loads(out.read_text())
        assert data["engine"] == engine
        answers[engine] = [r["response"] for r in data["results"]]
    assert answers["generate"] == answers["static"]


@pytest.mark.slow
def test_grpo_rollouts_through_the_engine(tiny_qwen25, sample_dataset, tmp_path):
    """train_lora.py --method grpo --engine static: rollouts and validation from the engine, several
    prompts' groups per generation call, the generation time in the step log."""
    out = tmp_path / "grpo"
    assert train_lora.main(["--model-name", str(tiny_qwen25), "--dataset-path", str(sample_dataset), "--output-dir",
                            str(out), "--max-steps", "2", "--save-steps", "2", "--eval-steps", "2", "--warmup-steps",
                            "0", "--max-seq-length", "384", "--method", "grpo", "--num-generations", "2",
                            "--max-completion-length", "8", "--batch-size", "2", "--gradient-accumulation-steps", "1",
                            "--engine", "static", "--prompts-per-generation", "2"]) == 0
    cfg = json.loads((out / "training_config.json").read_text())
    assert cfg["rollout_engine"] == "static" and cfg["backend"] == "hf"
    assert cfg["arguments"]["engine"] == "static" and cfg["arguments"]["prompts_per_generation"] == 2
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    train_logs = [r for r in records if "time/generation_s" in r]
    assert train_logs and all(r["time/generation_s"] > 0 for r in train_logs)
    assert any("eval_generation_tokens_per_s" in r for r in records)


def test_prompts_per_generation_must_split_into_batches(tmp_path, capsys):
    assert train_lora.main(["--model-name", "x", "--output-dir", str(tmp_path / "o"), "--method", "grpo",
                            "--num-generations", "3", "--batch-size", "2", "--gradient-accumulation-steps", "3",
                            "--prompts-per-generation", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --prompts-per-generation 3 x --num-generations 3 = 9 completions")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_chat_streams_the_engine_reply_as_generate_does(tiny_model, capsys):
    """test_model.py's single instruction and chat: the streamed text and the reply are generate's."""
    model, tok = load(tiny_model)
    messages = conversations(1, seed=2)[0]
    settings = utils.GenerationSettings(temperature=0, max_new_tokens=20, repetition_penalty=1.1)
    shown = {}
    replies = {}
    for engine in ("generate", "static"):
        capsys.readouterr()
        replies[engine] = chat.stream_reply(model, tok, messages, settings, engine)
        shown[engine] = capsys.readouterr().out
    assert replies["static"]["response"] == replies["generate"]["response"] and replies["static"]["tokens"] == 20
    assert shown["static"] == shown["generate"] and replies["static"]["response"] in shown["static"]


def test_rollout_flags_are_refused_for_sft(tmp_path, capsys):
    assert train_lora.main(["--model-name", "x", "--output-dir", str(tmp_path / "o"), "--engine", "static"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --engine sets how grpo samples and rewards its replies") and len(err.splitlines()) == 1


@pytest.mark.slow
def test_a_long_prompt_limits_only_its_own_reply(tiny_model):
    """Near the end of the context, a row gets what its own prompt leaves; its batch-mates keep
    their --max-new-tokens (positions are per row)."""
    model, tok = load(tiny_model)
    context = model.config.max_position_embeddings
    short = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    long = short[:-3] + [tok.convert_tokens_to_ids("Ġthe")] * (context - 10 - len(short)) + short[-3:]
    settings = utils.GenerationSettings(temperature=0, max_new_tokens=24, repetition_penalty=1.0)
    replies = engine_mod.Engine(model, tok.pad_token_id).generate([short, long, short], settings, {-1},
                                                                   context=context)
    assert [len(r.ids) for r in replies] == [24, 10, 24] and not any(r.stopped for r in replies)
    alone = engine_mod.Engine(model, tok.pad_token_id).generate([short], settings, {-1}, context=context)[0]
    assert replies[0].ids == replies[2].ids == alone.ids


def test_grpo_generation_batch_holds_whole_groups_and_batches():
    from types import SimpleNamespace

    from reasonforge import grpo

    default = SimpleNamespace(prompts_per_generation=None, num_generations=8)
    assert grpo.generation_batch_size(default, 2, on_gpu=True) == 64  # 8 questions x 8
    assert grpo.generation_batch_size(default, 3, on_gpu=True) == 72  # whole batches of 3 and groups of 8
    assert grpo.generation_batch_size(default, 2, processes=3, on_gpu=True) == 72
    assert grpo.generation_batch_size(default, 2, on_gpu=False) is None  # a CPU keeps TRL's default
    asked = SimpleNamespace(prompts_per_generation=2, num_generations=4)
    assert grpo.generation_batch_size(asked, 4, on_gpu=False) == 8


def test_grouped_decode_attention_equals_sdpa_without_copying_heads(monkeypatch):
    """One query position: the grouped view gives SDPA's result with repeated heads, masked rows
    included; any other shape is handed to SDPA itself."""
    import torch
    from transformers.integrations import sdpa_attention

    from reasonforge import decode_attention

    class Module:
        num_key_value_groups = 4

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    mask = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., :4] = False
    mask[2, ..., 7:] = False
    want, _ = sdpa_attention.sdpa_attention_forward(Module(), q, k, v, mask, scaling=0.25)
    calls = []
    real = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got, _ = decode_attention.grouped_decode_attention(Module(), q, k, v, mask, scaling=0.25)
    assert got.shape == want.shape == (3, 1, 8, 16) and not calls
    assert torch.allclose(got, want, atol=1e-6)
    prefill_q = torch.randn(3, 8, 10, 16)
    decode_attention.grouped_decode_attention(Module(), prefill_q, k, v, None, scaling=0.25)
    assert calls == [1]


def test_engine_decodes_with_grouped_attention_and_restores_the_model(tiny_model, monkeypatch):
    """The step runs the grouped path (counted), replies equal the engine on transformers' own SDPA,
    and the model's attention setting is SDPA again after each call."""
    from reasonforge import decode_attention

    model, tok = load(tiny_model)
    assert model.config.num_attention_heads > model.config.num_key_value_heads
    real, grouped_calls = decode_attention.grouped_decode_attention, []

    def counting(module, query, *args, **kwargs):
        grouped_calls.append(query.shape[2])
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(decode_attention, "grouped_decode_attention", counting)
    convs = conversations(5, seed=4)
    settings = utils.GenerationSettings(temperature=0, max_new_tokens=12, repetition_penalty=1.0)
    stats: dict = {}
    grouped = utils.generate_batch(model, tok, convs, settings, 5, desc=None, engine="static", stats=stats)
    assert stats["grouped_attention"] and grouped_calls.count(1) == 11 * model.config.num_hidden_layers
    assert {c._attn_implementation for c in decode_attention.text_configs(model)} == {"sdpa"}
    model._reasonforge_engine = engine_mod.Engine(model, tok.pad_token_id, grouped_attention=False)
    grouped_calls.clear()
    plain = utils.generate_batch(model, tok, convs, settings, 5, desc=None, engine="static")
    assert not grouped_calls and same_replies(plain, grouped) == len(convs)
