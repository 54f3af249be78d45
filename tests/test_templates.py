"""Chat templating and assistant masking against the real Qwen tokenizer."""

import pytest

import utils

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back.\n"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "think 1"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "reasoning_content": "think 2"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "<think>\ninline\n</think>\n\ny"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
     {"role": "system", "content": "mid"}, {"role": "user", "content": "q2"}],
    [{"role": "user", "content": "unicode: \u00e9\u4e2d $\\frac{1}{2}$ \n\n spaces  "}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [False, True])
def test_qwen3_builtin_is_byte_identical_to_real_tokenizer(qwen_tokenizer, messages, gen):
    ours = utils.render_chat(messages, template="qwen3", add_generation_prompt=gen)
    real = qwen_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert ours == real


def test_qwen3_enable_thinking_false_matches(qwen_tokenizer):
    msgs = CONVERSATIONS[0][:1]
    ours = utils.render_chat(msgs, template="qwen3", add_generation_prompt=True, enable_thinking=False)
    real = qwen_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert ours == real and ours.endswith("<think>\n\n</think>\n\n")


def test_tokenizer_template_path_uses_tokenizer(qwen_tokenizer):
    msgs = CONVERSATIONS[1]
    assert utils.render_chat(msgs, template=None, tokenizer=qwen_tokenizer) == \
        qwen_tokenizer.apply_chat_template(msgs, tokenize=False)


def test_qwen25_template_shape():
    text = utils.render_chat(CONVERSATIONS[1][1:], template="qwen2.5", add_generation_prompt=False)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nGreet back.\n\nHello.<|im_end|>\n"
    )


def test_qwen25_template_through_tokenizer_matches_builtin(qwen_tokenizer):
    """The saved template renders the same through transformers as through utils."""
    for msgs in CONVERSATIONS:
        ours = utils.render_chat(msgs, template="qwen2.5", add_generation_prompt=True)
        real = qwen_tokenizer.apply_chat_template(utils.clean_messages(msgs), chat_template=utils.QWEN25_TEMPLATE,
                                                   tokenize=False, add_generation_prompt=True)
        assert ours == real


def test_assistant_mask_token_by_token(qwen_tokenizer):
    msgs = CONVERSATIONS[2]
    text = utils.render_chat(msgs, template="qwen3")
    enc = utils.tokenize_for_training(text, qwen_tokenizer)
    ids, labels = enc["input_ids"], enc["labels"]
    im_start = qwen_tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Walk the turns: each begins with <|im_start|>role\n; only assistant bodies and their <|im_end|> count.
    trained = [i for i, lab in enumerate(labels) if lab != -100]
    assert all(labels[i] == ids[i] for i in trained)
    decoded_target = qwen_tokenizer.decode([ids[i] for i in trained])
    assert decoded_target == "b<|im_end|><think>\nthink 2\n</think>\n\nd<|im_end|>"
    role = None
    for i, tok in enumerate(ids):
        if i > 0 and ids[i - 1] == im_start:
            role = qwen_tokenizer.decode([tok])
        if tok in (im_start,) or (i > 0 and ids[i - 1] == im_start) or (i > 1 and ids[i - 2] == im_start):
            assert labels[i] == -100  # headers never trained
        if role in ("user", "system"):
            assert labels[i] == -100
    assert sum(1 for i in trained if ids[i] == im_end) == 2


def test_mask_off_trains_everything(qwen_tokenizer):
    text = utils.render_chat(CONVERSATIONS[0], template="qwen3")
    enc = utils.tokenize_for_training(text, qwen_tokenizer, train_on_responses_only=False)
    assert enc["labels"] == enc["input_ids"]


def test_unknown_template_is_user_error():
    with pytest.raises(utils.UserError, match="unknown chat template"):
        utils.render_chat(CONVERSATIONS[0], template="llama")


def test_template_family_and_misfit(qwen_tokenizer, qwen25_tokenizer_dir):
    from transformers import AutoTokenizer

    qwen25 = AutoTokenizer.from_pretrained(str(qwen25_tokenizer_dir))
    assert utils.template_family(qwen_tokenizer) == "qwen3" and utils.template_family(qwen25) == "qwen2.5"
    assert utils.template_misfit(utils.QWEN3_TEMPLATE, qwen_tokenizer) is None
    assert utils.template_misfit(utils.QWEN25_TEMPLATE, qwen25) is None
    assert "<think> is not a token" in utils.template_misfit(utils.QWEN3_TEMPLATE, qwen25)
    assert "never writes a thinking block" in utils.template_misfit(utils.QWEN25_TEMPLATE, qwen_tokenizer)


def test_auto_is_the_tokenizers_own_else_its_familys(qwen_tokenizer, qwen25_tokenizer_dir):
    from transformers import AutoTokenizer

    assert utils.resolve_chat_template("auto", qwen_tokenizer) == ("model", qwen_tokenizer.chat_template)
    bare = AutoTokenizer.from_pretrained(str(qwen25_tokenizer_dir))
    bare.chat_template = None
    assert utils.resolve_chat_template("auto", bare) == ("qwen2.5", utils.QWEN25_TEMPLATE)
    with pytest.raises(utils.UserError, match="needs the model's tokenizer"):
        utils.resolve_chat_template("auto", None)


def test_reasoning_is_kept_by_templates_that_do_not_know_it():
    """A template without reasoning_content (Qwen2.5's real one, SmolLM2's) would drop the worked
    steps; they are written in front of the answer instead."""
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Answer: 4", "reasoning_content": "2+2=4"}]
    plain = "{% for m in messages %}{{ m.role }}:{{ m.content }}|{% endfor %}"
    assert utils.clean_messages(msgs, plain)[1]["content"] == "2+2=4\n\nAnswer: 4"
    assert utils.clean_messages(msgs, utils.QWEN3_TEMPLATE)[1] == msgs[1]


def test_stop_ids_cover_the_models_eos_and_chatml_markers(qwen_tokenizer):
    from types import SimpleNamespace

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[151645, 151643]))
    tok = qwen_tokenizer
    ids = utils.stop_token_ids(tok, model)
    assert {151645, 151643, tok.convert_tokens_to_ids("<|im_start|>")} <= set(ids)


def test_reply_is_cut_at_the_first_stop_even_when_the_tokenizer_eos_is_endoftext(qwen_tokenizer):
    """A tokenizer whose eos is <|endoftext|> used to let replies read 'Hello!<|im_end|>\\n<|endoftext|>'
    and run on into an invented turn; the reply ends at <|im_end|>."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen_tokenizer.name_or_path)
    tok.eos_token = "<|endoftext|>"
    generated = tok("Hello!<|im_end|>\n<|im_start|>user\nmore<|im_end|><|endoftext|>", add_special_tokens=False)["input_ids"]
    ids, stopped = utils.reply_tokens(torch.tensor(generated), set(utils.stop_token_ids(tok)))
    assert tok.decode(ids) == "Hello!" and stopped
    ids, stopped = utils.reply_tokens(torch.tensor(generated[:2]), set(utils.stop_token_ids(tok)))
    assert not stopped
