"""GRPO: reward functions, the --rewards flag, prompts from prepared data, settings, and a tiny CPU run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import utils
from reasonforge import grpo, grpo_logs, grpo_trainer, rewards
from reasonforge.process_state import ProcessChanges
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------

def test_correctness_scores_the_final_answer_against_the_reference():
    completions = ["3 + 4 = 7, so the answer is 7.", "The answer is 8.", "I am not sure.",
                   "<think>3 + 4 is 7", "<think>3 + 4 = 7</think>\n\\boxed{7}", "7.0"]
    assert rewards.correctness(completions, answer=["7"] * 6) == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]


def test_correctness_reads_conversational_completions():
    completions = [[{"role": "assistant", "content": "Answer: 1/2"}],
                   [{"role": "assistant", "content": "Answer: 0.3"}],
                   [{"role": "assistant", "content": [{"type": "text", "text": "Answer: 0.5"}]}],
                   [{"role": "assistant", "reasoning_content": "half of one", "content": "\\boxed{0.5}"}]]
    assert rewards.correctness(completions, answer=["0.5"] * 4) == [1.0, 0.0, 1.0, 1.0]


def test_correctness_leaves_rows_without_a_reference_unscored():
    assert rewards.correctness(["Answer: 5", "Answer: 5"], answer=["5", ""]) == [1.0, None]
    assert rewards.correctness(["Answer: 5"]) == [None]


@pytest.mark.parametrize("text, score", [
    ("The answer is 12.", 1.0),                                  # one explicit answer
    ("<think>5 + 7 = 12</think>\nAnswer: 12", 1.0),              # closed thinking, one answer
    ("</think>\nAnswer: 12", 1.0),                               # thinking opened by the prompt, closed here
    ("5 + 7 = 12", 0.75),                                        # only a bare number
    ("Answer: 11\nAnswer: 12", 0.75),                            # several answers
    ("I do not know.", 0.5),                                     # no answer at all
    ("<think>5 + 7 is", 0.0),                                    # thinking never closed
    ("<think>a</think> Answer: 3 <think>b", 0.0),                # the last block is open
])
def test_format_gives_documented_partial_credit(text, score):
    assert rewards.format_reward([text]) == [score]
    assert rewards.format_reward([[{"role": "assistant", "content": text}]]) == [score]


def test_reward_names_are_the_metric_names_trl_logs():
    from trl.trainer.utils import get_callable_name

    funcs, weights = rewards.reward_functions({"correctness": 1.0, "format": 0.2})
    assert [get_callable_name(f) for f in funcs] == ["correctness", "format"]
    assert weights == [1.0, 0.2]


def test_parse_rewards_reads_names_and_weights_in_order():
    assert rewards.parse_rewards("correctness,format") == {"correctness": 1.0, "format": 1.0}
    assert rewards.parse_rewards(" format = 0.5 , correctness=2") == {"format": 0.5, "correctness": 2.0}
    assert list(rewards.parse_rewards(rewards.DEFAULT_REWARDS)) == ["correctness", "format"]


@pytest.mark.parametrize("spec, words", [
    ("correctness,lenght", ["'lenght'", "correctness, format"]),
    ("correctness=high", ["'high'", "correctness", "--rewards correctness=1,format=0.2"]),
    ("correctness=nan", ["'nan'"]),
    ("", ["empty", "correctness, format"]),
    ("format,format=2", ["twice", "'format'"]),
    ("correctness=0,format=0", ["weight 0"]),
])
def test_parse_rewards_errors_name_the_bad_entry_and_the_choices(spec, words):
    with pytest.raises(UserError) as err:
        rewards.parse_rewards(spec)
    message = str(err.value)
    assert "\n" not in message and message.startswith("--rewards")
    for word in words:
        assert word in message


# ---------------------------------------------------------------------------------------------
# Prompts from prepared data
# ---------------------------------------------------------------------------------------------

SECRET = "SECRET-REPLY-314159"


def _split(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def _row(question: str, answer: str, history: list[dict] | None = None) -> dict:
    return {"messages": [{"role": "system", "content": "Be brief."}, *(history or []),
                         {"role": "user", "content": question},
                         {"role": "assistant", "content": f"{SECRET} so {answer}"}],
            "answer": answer, "domain": "Math"}


@pytest.fixture(scope="module")
def qwen25_tokenizer(qwen25_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen25_tokenizer_dir))


def test_prompts_end_at_the_generation_prompt_and_hold_no_answer(qwen25_tokenizer):
    earlier = [{"role": "user", "content": "First?"}, {"role": "assistant", "content": "One."}]
    split = _split([_row("What is 2 + 3?", "5"), _row("And 4 + 4?", "8", history=earlier)])
    source = utils.BUILTIN_TEMPLATES["qwen2.5"]
    rows = grpo.grpo_rows(split, source, qwen25_tokenizer)
    assert rows.column_names == ["prompt", "answer"] and rows["answer"] == ["5", "8"]
    for prompt, row in zip(rows["prompt"], split):
        assert prompt.endswith("<|im_start|>user\n" + row["messages"][-2]["content"] + "<|im_end|>\n<|im_start|>assistant\n")
        assert SECRET not in prompt
        assert prompt == utils.render_chat(row["messages"][:-1], tokenizer=qwen25_tokenizer, source=source,
                                           add_generation_prompt=True)
    assert "First?" in rows["prompt"][1] and "One." in rows["prompt"][1]  # earlier turns stay as context
    # Without a tokenizer the same template renders the same bytes.
    assert grpo.grpo_rows(split, source)["prompt"] == rows["prompt"]


def test_prompts_from_a_prepared_dataset(sample_dataset, qwen25_tokenizer):
    dd, _ = utils.load_prepared_dataset(sample_dataset)
    source = utils.BUILTIN_TEMPLATES["qwen2.5"]
    rows = grpo.grpo_rows(dd["train"], source, qwen25_tokenizer)
    assert len(rows) == len(dd["train"]) and rows["answer"] == dd["train"]["answer"]
    assert all(p.endswith("<|im_end|>\n<|im_start|>assistant\n") for p in rows["prompt"])
    replies = [m[-1]["content"] for m in dd["train"]["messages"]]
    assert not any(reply in prompt for reply, prompt in zip(replies, rows["prompt"]))


def test_rows_without_an_answer_or_a_user_turn_are_left_out(qwen25_tokenizer):
    no_user = {"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "7"}], "answer": "7"}
    split = _split([_row("What is 2 + 3?", "5"), _row("What is 1 + 1?", ""), no_user])
    assert grpo.grpo_rows(split, utils.BUILTIN_TEMPLATES["qwen2.5"])["answer"] == ["5"]


def test_long_prompts_are_left_out(qwen25_tokenizer):
    split = _split([_row("What is 2 + 3?", "5"), _row("word " * 200 + "?", "6")])
    rows = grpo.grpo_rows(split, utils.BUILTIN_TEMPLATES["qwen2.5"], qwen25_tokenizer, max_prompt_tokens=100)
    assert rows["answer"] == ["5"]
    with pytest.raises(UserError, match="longer than 5 tokens"):
        grpo.grpo_rows(split, utils.BUILTIN_TEMPLATES["qwen2.5"], qwen25_tokenizer, max_prompt_tokens=5)


def test_a_split_without_answers_is_a_clear_error():
    source = utils.BUILTIN_TEMPLATES["qwen2.5"]
    rows = [_row("What is 2 + 3?", "5")]
    for row in rows:
        row.pop("answer")
    with pytest.raises(UserError, match="no 'answer' column .*--column-map COLUMN=answer"):
        grpo.grpo_rows(_split(rows), source)
    with pytest.raises(UserError, match="no row of the validation split has a reference answer"):
        grpo.grpo_rows(_split([_row("What is 2 + 3?", " ")]), source, split_name="validation")


# ---------------------------------------------------------------------------------------------
# Settings and config
# ---------------------------------------------------------------------------------------------

def test_default_settings_are_the_24gb_plan():
    s = grpo.GRPOSettings()
    assert (s.num_generations, s.max_completion_length, s.beta, s.temperature) == (8, 512, 0.0, 1.0)
    assert s.problems(batch_size=8, gradient_accumulation_steps=1) == []
    assert s.problems(batch_size=2, gradient_accumulation_steps=4) == []


def test_settings_problems_name_the_flags():
    problems = grpo.GRPOSettings(num_generations=8, temperature=0, beta=-1).problems(2, 3)
    text = " ".join(problems)
    assert "--temperature 0 must be above 0" in text and "--beta -1 must be" in text
    assert "--batch-size 2 x --gradient-accumulation-steps 3 = 6 completions per step is not a multiple of " \
           "--num-generations 8" in text
    assert "--gradient-accumulation-steps 4" in text
    assert "--gradient-accumulation-steps 8)" in grpo.GRPOSettings(num_generations=8).problems(3, 1)[0]
    assert grpo.GRPOSettings(num_generations=1).problems(4, 1)[0].startswith("--num-generations 1 must be 2 or more")
    assert "not a finite number" in grpo.GRPOSettings(learning_rate=math.nan).problems(8, 1)[0]


def test_config_chooses_the_best_checkpoint_on_validation_correctness(tmp_path):
    s = grpo.GRPOSettings(num_generations=4, max_completion_length=64, beta=0.01, temperature=0.9, learning_rate=1e-5)
    weights = {"format": 0.2, "correctness": 1.0}
    cfg = grpo.grpo_config(s, weights, output_dir=tmp_path, max_steps=10, batch_size=4, gradient_accumulation_steps=2,
                           save_steps=5, report_to=())
    assert (cfg.num_generations, cfg.max_completion_length, cfg.beta, cfg.temperature) == (4, 64, 0.01, 0.9)
    assert cfg.learning_rate == 1e-5 and cfg.reward_weights == [0.2, 1.0]
    assert cfg.metric_for_best_model == "eval_rewards/correctness/mean" and cfg.greater_is_better
    assert cfg.load_best_model_at_end and cfg.eval_steps == 5 and cfg.num_generations_eval == 1
    assert cfg.generation_batch_size == 8 and not cfg.bf16
    only_format = grpo.grpo_config(s, {"format": 1.0}, output_dir=tmp_path, batch_size=4, report_to=())
    assert only_format.metric_for_best_model == "eval_reward"
    no_eval = grpo.grpo_config(s, weights, output_dir=tmp_path, batch_size=4, report_to=(), has_eval=False)
    assert no_eval.eval_strategy == "no" and not no_eval.load_best_model_at_end


def test_importing_the_modules_loads_nothing_heavy():
    code = ("import sys; from reasonforge import grpo, grpo_logs, grpo_trainer, rewards, training_args; "
            "print(','.join(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


# ---------------------------------------------------------------------------------------------
# Step log and curve
# ---------------------------------------------------------------------------------------------

def test_step_summary_names_the_figures():
    logs = {"loss": 0.0, "rewards/correctness/mean": 0.25, "rewards/format/mean": 0.8,
            "completions/mean_length": 40.0, "generation/tokens_per_s": 122.96, "step_time": 2.0}
    summary = grpo_logs.step_summary(logs, completions_per_step=8)
    assert summary == {"reward_correctness": 0.25, "reward_format": 0.8, "share_correct": 0.25,
                       "completion_length_mean": 40.0, "generation_tokens_per_s": 123.0}
    line = grpo_logs.summary_line(summary, 3, 10)
    assert line == "step 3/10 | reward correctness 0.250 format 0.800 | correct 25.0% | completion 40 tok | generation 123 tok/s"
    # A trainer that does not time generation: estimated from the step time.
    del logs["generation/tokens_per_s"]
    estimated = grpo_logs.step_summary(logs, completions_per_step=8)
    assert estimated["generation_tokens_per_s"] == 160.0 and estimated["generation_tokens_per_s_estimated"]
    evals = grpo_logs.step_summary({"eval_loss": 0.0, "eval_rewards/correctness/mean": 0.5}, 8)
    assert evals == {"eval_reward_correctness": 0.5, "eval_share_correct": 0.5}
    assert "validation" in grpo_logs.summary_line(evals, 4, 10)
    assert grpo_logs.summary_line(grpo_logs.step_summary({"loss": 1.0}, 8), 1, 2) is None


def test_running_mean():
    assert grpo_logs.running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert grpo_logs.running_mean([2.0], 5) == [2.0]


def test_reward_curve_png(tmp_path):
    history = [{"step": s, "rewards/correctness/mean": s / 10, "rewards/format/mean": 0.5} for s in range(1, 6)]
    history.append({"step": 5, "eval_rewards/correctness/mean": 0.4})
    assert grpo_logs.plot_rewards(history, tmp_path / "reward_curve.png")
    assert (tmp_path / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not grpo_logs.plot_rewards([{"step": 1, "loss": 1.0}], tmp_path / "none.png")


def test_torch_logprobs_match_log_softmax_and_carry_gradients():
    import torch

    torch.manual_seed(0)
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    targets = torch.tensor([0, 3, 10, 4, 4])
    logp, entropy, sq, mean, top1 = grpo_trainer.TorchLogProbs.apply(
        hidden, weight, None, targets, 0.7, 4, None, 1.0, ("log_probs", "entropy", "is_top1"))
    full = torch.log_softmax((hidden @ weight.t()) / 0.7, dim=-1)
    assert torch.allclose(logp, full.gather(-1, targets[:, None]).squeeze(-1), atol=1e-6)
    assert torch.allclose(entropy, -(full.exp() * full).sum(-1), atol=1e-5)
    assert sq is None and mean is None and top1.dtype == torch.bool
    logp.sum().backward()
    assert hidden.grad is not None and weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# A tiny GRPO run on the CPU
# ---------------------------------------------------------------------------------------------

def length(completions, **kwargs):
    """A dense test reward: a random model never answers right, so correctness alone has no variance to learn from."""
    return [len(rewards.completion_text(c)) / 100 for c in completions]


def _stop_after(step: int):
    """A callback that ends training once `step` is done (and saved), as a kill right after a checkpoint would."""
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                control.should_training_stop = True
            return control

    return StopAfter()


def _tiny_run(model_dir, dataset_dir, out: Path, stop_after: int | None = None, resume: str | None = None):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    dd, _ = utils.load_prepared_dataset(dataset_dir)
    source = utils.BUILTIN_TEMPLATES["qwen2.5"]
    train = grpo.grpo_rows(dd["train"], source, tokenizer)
    val = grpo.grpo_rows(dd["validation"], source, tokenizer, split_name="validation").select(range(4))
    weights = rewards.parse_rewards("correctness=1,format=0.2,length=1")
    settings = grpo.GRPOSettings(num_generations=4, max_completion_length=16, learning_rate=5e-3)
    config = grpo.grpo_config(settings, weights, output_dir=out, max_steps=4, batch_size=4, save_steps=2,
                              eval_batch_size=4, seed=3, report_to=())
    callbacks = [grpo_logs.grpo_step_logger(out / "logs" / "metrics.jsonl")]
    if stop_after:
        callbacks.append(_stop_after(stop_after))
    with ProcessChanges() as changes:  # TRL's log-prob kernel, where Triton is missing, is put back after
        trainer = grpo_trainer.build_grpo_trainer(model, tokenizer, train, val, config, weights, callbacks=callbacks,
                                                  changes=changes)
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def _lora_and_base(model) -> tuple[dict, dict]:
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    return ({k: v for k, v in state.items() if "lora_" in k}, {k: v for k, v in state.items() if "lora_" not in k})


@pytest.fixture
def with_length_reward(monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "length", length)


@pytest.mark.slow
def test_tiny_grpo_run_trains_logs_every_reward_and_saves_a_reloadable_adapter(
        tiny_qwen25, sample_dataset, tmp_path, with_length_reward):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    initial = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_qwen25)),
                             LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                        task_type="CAUSAL_LM"))
    lora_before, base_before = _lora_and_base(initial)
    trainer = _tiny_run(tiny_qwen25, sample_dataset, tmp_path)

    records = grpo_logs.read_jsonl(tmp_path / "logs" / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        for key in ("reward_correctness", "reward_format", "reward_length", "share_correct",
                    "completion_length_mean", "generation_tokens_per_s", "rewards/length/mean", "tokens_per_s"):
            assert isinstance(r[key], (int, float)), (key, r)
        assert 0 < r["completion_length_mean"] <= 16 and r["generation_tokens_per_s"] > 0
    evals = [r for r in records if "eval_share_correct" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert trainer.state.best_model_checkpoint in (str(tmp_path / "checkpoint-2"), str(tmp_path / "checkpoint-4"))
    assert grpo_logs.plot_rewards(trainer.state.log_history, tmp_path / "reward_curve.png")

    lora_after, base_after = _lora_and_base(trainer.model)
    assert lora_after.keys() == lora_before.keys()
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_after), "no LoRA weight moved"
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_after), "a base weight moved"

    trainer.save_model(str(tmp_path / "final_model"))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_qwen25)),
                                         str(tmp_path / "final_model"))
    lora_reloaded, _ = _lora_and_base(reloaded)
    assert all(torch.equal(lora_reloaded[k], lora_after[k]) for k in lora_after)


@pytest.mark.slow
def test_a_resumed_run_sees_the_same_rewards(tiny_qwen25, sample_dataset, tmp_path, with_length_reward):
    whole = _tiny_run(tiny_qwen25, sample_dataset, tmp_path / "whole")
    stopped = _tiny_run(tiny_qwen25, sample_dataset, tmp_path / "resumed", stop_after=2)
    assert stopped.state.global_step == 2
    resumed = _tiny_run(tiny_qwen25, sample_dataset, tmp_path / "resumed",
                        resume=str(tmp_path / "resumed" / "checkpoint-2"))

    def rewards_at(trainer, steps):
        return [(h["step"], h["rewards/length/mean"], h["rewards/format/mean"])
                for h in trainer.state.log_history if "loss" in h and h["step"] in steps]

    assert len(rewards_at(whole, (3, 4))) == 2
    assert rewards_at(resumed, (3, 4)) == rewards_at(whole, (3, 4))
    assert json.loads((tmp_path / "resumed" / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
