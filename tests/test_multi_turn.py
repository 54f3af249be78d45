"""Multi-turn rows: each reply is taught as the model produces it (Qwen3 rewrites earlier turns),
and conversations that open alike never land on both sides of the split."""

from __future__ import annotations

import json

import datasets

import utils
from reasonforge import sft

TWO_TURNS = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5", "reasoning_content": "Add two and three."},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "20", "reasoning_content": "Five times four."},
]


class Config:
    max_seq_length = 512
    train_on_responses_only = True
    long_rows = "drop"


def targets(row, tokenizer) -> str:
    return tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100])


def rows_of(conversations, tokenizer, source):
    dd = datasets.DatasetDict({s: datasets.Dataset.from_list([{"messages": m} for m in conversations])
                               for s in ("train", "validation")})
    train, _, counts = sft.tokenize_splits(dd, tokenizer, source, Config)
    return list(train), counts


def test_qwen3_rows_teach_each_reply_as_it_is_generated(qwen_tokenizer):
    """The real Qwen3 template drops earlier turns' reasoning; in one row the first reply would be a
    bare "5" right after <|im_start|>assistant\\n, where the model opens <think> at inference."""
    own = qwen_tokenizer.chat_template
    train, counts = rows_of([TWO_TURNS], qwen_tokenizer, own)
    assert len(train) == 2
    assert counts["train"]["conversations_one_row_per_turn"] == 1 and counts["train"]["rows_one_per_turn"] == 2
    first, second = train
    # each row is exactly what the model's own template renders for the conversation up to that reply
    assert first["input_ids"] == qwen_tokenizer.apply_chat_template(TWO_TURNS[:2], tokenize=True, return_dict=True)["input_ids"]
    assert second["input_ids"] == qwen_tokenizer.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=True)["input_ids"]
    # token by token: each row's only target is its last reply, opened by <think> with its own reasoning
    assert targets(first, qwen_tokenizer) == "<think>\nAdd two and three.\n</think>\n\n5<|im_end|>"
    assert targets(second, qwen_tokenizer) == "<think>\nFive times four.\n</think>\n\n20<|im_end|>"
    think = qwen_tokenizer.convert_tokens_to_ids("<think>")
    for row in train:
        first_target = next(i for i, lab in enumerate(row["labels"]) if lab != -100)
        assert row["input_ids"][first_target] == think
        assert qwen_tokenizer.decode(row["input_ids"][first_target - 3:first_target]) == "<|im_start|>assistant\n"


def test_templates_that_keep_history_train_one_row(qwen_tokenizer):
    """Qwen2.5's template renders every turn the same wherever it stands: one row, both replies targets
    (their reasoning written in front of the answer, as that template does)."""
    train, counts = rows_of([TWO_TURNS], qwen_tokenizer, utils.QWEN25_TEMPLATE)
    assert len(train) == 1 and counts["train"]["conversations_one_row_per_turn"] == 0
    assert targets(train[0], qwen_tokenizer) == "Add two and three.\n\n5<|im_end|>Five times four.\n\n20<|im_end|>"


def test_single_turn_rows_are_unchanged(qwen_tokenizer):
    one = TWO_TURNS[:2]
    train, _ = rows_of([one], qwen_tokenizer, qwen_tokenizer.chat_template)
    expected = utils.encode_conversation(one, qwen_tokenizer, True, 512, qwen_tokenizer.chat_template)
    assert len(train) == 1 and train[0]["input_ids"] == expected["input_ids"] and train[0]["labels"] == expected["labels"]


def test_evaluation_perplexity_scores_the_rows_training_trained(qwen_tokenizer):
    from reasonforge import evaluation

    class Args:
        max_seq_length, train_on_responses_only, long_rows = 512, True, "drop"

    tok = qwen_tokenizer
    encoded, counts = evaluation.encode_rows({"messages": [TWO_TURNS]}, tok, Args)
    train, _ = rows_of([TWO_TURNS], tok, tok.chat_template)
    assert [r["labels"] for r in encoded] == [r["labels"] for r in train]
    assert counts["rows"] == 1 and counts["rows_scored_as"] == 2


def branching(n: int) -> list[dict]:
    """n conversations that open with one of n/2 exchanges and branch at their second question."""
    rows = []
    for i in range(n):
        opening = i // 2
        rows.append({"messages": [
            {"role": "user", "content": f"Question {opening}: what is {opening} + 1?"},
            {"role": "assistant", "content": str(opening + 1)},
            {"role": "user", "content": f"follow-up {i}: and doubled?"},
            {"role": "assistant", "content": str(2 * (opening + 1))}]})
    return rows


def test_conversations_that_open_alike_stay_on_one_side(tmp_path):
    import data_preparation as dp

    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in branching(60)))
    out = tmp_path / "prepared"
    assert dp.main(["--dataset", str(src), "--skip-upload", "--output-dir", str(out), "--val-size", "0.2"]) == 0
    dd = datasets.load_from_disk(str(out))

    def openings(split):
        return {(m[0]["content"], m[1]["content"]) for m in dd[split]["messages"]}

    assert len(dd["validation"]) > 0
    assert not openings("train") & openings("validation")  # no opening exchange on both sides
    stats = json.loads((out / "manifest.json").read_text())["split_by_prompt"]
    # the count measures the leak: opening questions on both sides, 0 here, counted independently below
    shared = {m[0]["content"] for m in dd["train"]["messages"]} & {m[0]["content"] for m in dd["validation"]["messages"]}
    assert stats["validation_prompts_also_in_train"] == len(shared) == 0
    assert stats["prompt_groups"] == 30 and stats["rows_sharing_a_prompt"] == 60


def test_split_key_is_the_first_user_turn():
    from reasonforge.conversations import prompt_key

    a, b = branching(2)[0]["messages"], branching(2)[1]["messages"]
    assert prompt_key(a) == prompt_key(b)
    assert prompt_key([{"role": "system", "content": "x"}, *a]) == prompt_key(a)
