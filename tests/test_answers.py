"""The answer scorer: every pair from the correctness report, and the extraction rules."""

import collections

import pytest

from reasonforge.answers import answers_match, final_answer

# (predicted, reference): the wrong answers the old regex scorer accepted, then right ones it refused.
WRONG = [
    ("\\boxed{2^{10}}", "2"), ("2^{10}", "2"), ("10^6", "10"), ("3\\sqrt{2}", "3"), ("2x", "2"), ("2 x", "2"),
    ("(1, 2)", "12"), ("1234567", "1234568"), ("\\frac{1}{3}", "0.333"), ("12", "13"), ("-0.5", "0.5"),
    ("[0, 1)", "[0, 1]"), ("yes", "no"),
]
RIGHT = [
    ("-\\frac{1}{2}", "-0.5"), ("\\dfrac{1}{2}", "\\frac12"), ("50\\%", "0.5"), ("\\frac{1}{4}", "$\\frac{1}{4}$"),
    ("0.25", "$\\frac{1}{4}$"), ("2 s", "$2\\,\\mathrm{s}$"), ("x = 5", "$x = 5$"), ("1,000", "1000"),
    ("3.0", "3"), ("120 km", "120"), ("5 \\text{ m/s}", "5"), ("12 apples", "12"), ("(1,2)", "(1, 2)"),
    ("\\sqrt{8}", "2\\sqrt{2}"), ("6.02e23", "6.02 \\times 10^{23}"), ("Paris", "paris"), ("Mitochondria.", "mitochondria"),
]


@pytest.mark.parametrize("predicted,reference", WRONG)
def test_wrong_answers_are_refused(predicted, reference):
    assert answers_match(predicted, reference) is False


@pytest.mark.parametrize("predicted,reference", RIGHT)
def test_equal_values_are_accepted(predicted, reference):
    assert answers_match(predicted, reference) is True


@pytest.mark.parametrize("response,expected", [
    ("so the total is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{4}}", "\\frac{1}{4}"),
    ("We get \\boxed{2^{10}} in the end", "2^{10}"),
    ("<think>\nmaybe 7\n</think>\n\nAnswer: 12", "12"),
    ("<think>\nhm\n</think>\n\nAnswer: $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("The final answer is 3.5.", "3.5"),
    ("Final answer: **12**", "12"),
    ("#### 72", "72"),
    ("we get 10 then 20 apples", "20"),
    ("no number here", None),
    # A thinking block cut off by --max-new-tokens has no answer, not its last number.
    ("<think>\nfirst 3, then 4, then", None),
    ("", None),
])
def test_final_answer(response, expected):
    assert final_answer(response) == expected


def test_no_answer_never_matches():
    assert answers_match(None, "3") is False and answers_match("3", "") is False and answers_match("", "3") is False


def test_extraction_then_match_end_to_end():
    assert answers_match(final_answer("Adding: 2 + 3 = 5. Answer: 5 m"), "5")
    assert not answers_match(final_answer("The answer is \\boxed{2^{10}}."), "2")
    assert not answers_match(final_answer("<think>the answer is 1024"), "1024")


@pytest.mark.parametrize("response,expected", [
    # prose that only uses the word states no answer: the stated one, or the last number, wins
    ("Answer: 42\n\nThis answer uses addition.", "42"),
    ("Answer: 7\nI hope this answer helps!", "7"),
    ("To answer the question, we add 3 and 4 to get 7.", "7"),
    ("Let me answer this.\n3 + 4 is 7. Total: 7", "7"),
    ("Answer: 42 (the sum)", "42"),
    ("Final Answer: The final answer is 42. I hope it is correct.", "42"),
    ("**Answer:** 15", "15"),
    ("**Answer**: 15", "15"),
    ("Answer: f(x) = 2x", "f(x) = 2x"),
    ("Answer: (1, 2)", "(1, 2)"),
])
def test_only_stated_answers_are_read(response, expected):
    assert final_answer(response) == expected


GSM8K_REFERENCE = ("Each box holds 1,774,032 pens, so 3 boxes hold 3 * 1,774,032 = <<3*1774032=5322096>>5,322,096 pens.\n"
                   "#### 5,322,096")


def test_worked_solution_references_are_cut_to_their_value():
    """GSM8K's answer column is a whole worked solution ending in '#### N'; it is the reference
    data_preparation keeps, so every correct reply scored wrong against it before."""
    from reasonforge.answers import reference_answer

    assert reference_answer(GSM8K_REFERENCE) == "5,322,096"
    assert answers_match(final_answer("so 5322096 pens.\nAnswer: 5322096"), GSM8K_REFERENCE)
    assert answers_match("5,322,096", GSM8K_REFERENCE)
    assert not answers_match("1774032", GSM8K_REFERENCE)  # a number from the working is not the answer
    assert reference_answer("The sum is \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert answers_match("0.5", "The sum is \\boxed{\\frac{1}{2}}.")
    assert reference_answer("mitochondria") == "mitochondria"
    assert reference_answer("3 + 4 = 7.\nAnswer: 7") == "7"
    assert reference_answer("The answer is 1,234") == "1,234" and answers_match("1234", "Answer: 1234")
    free_text = "Paris is the capital.\nIt has about 2 million people."
    assert reference_answer(free_text) == free_text and not answers_match("2", free_text)


def test_a_sentence_around_one_number_is_that_number():
    assert answers_match(final_answer("Answer: She has 7 apples."), "7")
    assert not answers_match(final_answer("Answer: She has 8 apples."), "7")
    # more than one number in the sentence: no guessing which one is meant
    assert not answers_match("between 6 and 7 apples", "7")


# Round two's seventy independent pairs: the seven the checker got wrong, each with its neighbours.
HEDGED_OR_SEVERAL = [
    ("Answer: 3 or 4", "3"), ("Answer: 12 and 13", "12"), ("Answer: 5 apples and 3 oranges", "5"),
    ("Answer: 10 minus 3", "10"), ("Answer: 3 (or 4)", "3"), ("Answer: either 3 or 4", "4"),
    ("Answer: (C) 12", "B"), ("Answer: 2 1/2", "2"), ("Answer: 3, 4", "3"),
]
RIGHT_AFTER_ALL = [
    ("Answer: 2 1/2", "2.5"), ("Answer: -2 1/2", "-2.5"), ("Answer: 2\\frac{1}{2}", "\\frac{5}{2}"),
    ("Answer: (B) 12", "B"), ("Answer: B) 12", "(B)"), ("Answer: Option B", "B"), ("Answer: B", "(B) 12"),
    ("Answer: 12 and 13", "12 and 13"), ("Answer: \\frac{1}{2} cup", "0.5"), ("Answer: 42 (the sum)", "42"),
    ("Answer: 6.02e23 molecules", "6.02 \\times 10^{23}"), ("Answer: 1,000 apples", "1000"),
]


@pytest.mark.parametrize("response,reference", HEDGED_OR_SEVERAL)
def test_hedged_or_multi_valued_answers_are_wrong(response, reference):
    assert answers_match(final_answer(response), reference) is False


@pytest.mark.parametrize("response,reference", RIGHT_AFTER_ALL)
def test_mixed_numbers_choices_and_units_are_read_as_values(response, reference):
    assert answers_match(final_answer(response), reference) is True


def test_a_reply_cut_off_without_a_stated_answer_has_none():
    cut = "First 3 + 4 = 7, then multiply by"
    assert final_answer(cut) == "7"  # read as a finished reply, its last number
    assert final_answer(cut, truncated=True) is None
    assert not answers_match(final_answer("So we have 7 groups of 12, giving", truncated=True), "12")
    # an answer stated or boxed before the cut still counts
    assert final_answer("Answer: 7\nLet me double-check: 3 + 4", truncated=True) == "7"
    assert final_answer("\\boxed{7} because 3 + 4 is", truncated=True) == "7"


def test_grpo_correctness_gives_a_cut_reply_nothing():
    from reasonforge.rewards import correctness, format_reward

    replies = ["3 + 4 gives 7, and then", "Answer: 7"]
    assert correctness(replies, answer=["7", "7"]) == [1.0, 1.0]  # TRL's columns without the flag: as before
    assert correctness(replies, answer=["7", "7"], truncated=[True, True]) == [0.0, 1.0]
    assert format_reward(replies, truncated=[True, False]) == [0.5, 1.0]


def test_grpo_trainer_marks_completions_the_length_limit_cut(monkeypatch):
    """The trainer hands the rewards a `truncated` column by TRL's own rule: no stop or pad token at the end."""
    from trl import GRPOTrainer

    from reasonforge import grpo_trainer

    seen = {}

    def fake(self, inputs, prompts, completions, completion_ids_list):
        seen["truncated"] = [row["truncated"] for row in inputs]
        return None

    monkeypatch.setattr(GRPOTrainer, "_calculate_rewards", fake)
    cls = grpo_trainer.grpo_trainer_class()
    trainer = cls.__new__(cls)
    trainer.eos_token_ids = [2]
    trainer._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    trainer._tokenizer = type("T", (), {"pad_token_id": 0})()
    trainer.model = type("M", (), {"training": True})()
    trainer._calculate_rewards([{"answer": "7"}] * 3, ["p"] * 3, ["a", "b", "c"], [[5, 2], [5, 6], [5, 0]])
    assert seen["truncated"] == [False, True, False]


@pytest.mark.parametrize("response, reference, expected", [
    ("The answer is 5. Answer: 6", "5", False),  # the later statement on the line wins
    ("so the answer is 5, no wait. Answer: 6", "6", True),
    ("Answer: 6 (the answer is not 5)", "6", True),
    ("Answer: True", "true", True),
    ("Answer: 0.5", "½", True),
    ("Answer: 12", "１２", True),  # full-width digits
    ("Answer: 3", "٣", True),  # Arabic-Indic digit
    ("Answer: −5", "-5", True),  # the minus sign
])
def test_last_statement_and_unicode_forms(response, reference, expected):
    assert answers_match(final_answer(response), reference) is expected


# Round three (hostile review S6): a hedge or a list over choice letters is wrong against one letter,
# as it is over numbers; a choice whose own text carries words is still read by its letter.
@pytest.mark.parametrize("response, reference, expected", [
    ("Answer: A or B", "A", False), ("Answer: A and B", "A", False), ("Answer: (A) or (C)", "A", False),
    ("Answer: A (or maybe B)", "A", False), ("Answer: A/B", "A", False), ("Answer: (B) or (C)", "C", False),
    ("Answer: Either A or B", "A", False), ("Answer: B, C", "B", False),
    ("Answer: A", "A", True), ("Answer: (A) 12", "A", True), ("Answer: (C) A and B", "C", True),
    ("Answer: (B) red or blue", "B", True), ("Answer: A or B", "A or B", True),
])
def test_hedged_choices_are_wrong(response, reference, expected):
    assert answers_match(final_answer(response), reference) is expected


def test_a_parenthesised_alternative_is_not_cut_as_an_aside():
    assert final_answer("Answer: (A) or (C)") == "(A) or (C)"
    assert final_answer("Answer: 3 or (4)") == "3 or (4)"
    assert final_answer("Answer: (A), (B)") == "(A), (B)" and not answers_match("(A), (B)", "A")
    assert final_answer("Answer: 42 (the sum)") == "42"


# Round three (S7): correct answers the checker missed, and their wrong neighbours.
@pytest.mark.parametrize("response, reference, expected", [
    ("Answer: approximately 7", "7", True), ("Answer: about 7", "7", True), ("Answer: roughly 7", "7", True),
    ("Answer: \\approx 7", "7", True), ("Answer: approximately 8", "7", False),
    ("Answer: €5", "5", True), ("Answer: 5€", "5", True), ("Answer: £1,000", "1000", True),
    ("Answer: ¥300", "300", True), ("Answer: $5", "5", True), ("Answer: €6", "5", False),
    ("Answer: √2", "\\sqrt{2}", True), ("Answer: √(2)", "\\sqrt{2}", True), ("Answer: 3√2", "3\\sqrt{2}", True),
    ("Answer: √3", "\\sqrt{2}", False), ("Answer: √2", "2", False),
    ("Answer: 1 234", "1234", True), ("Answer: 1\u2009234", "1234", True), ("Answer: 1\u202f234 567", "1234567", True),
    ("Answer: 12 345.5", "12345.5", True), ("Answer: 1 234", "1,234", True),
    ("Answer: 1 2", "12", False), ("Answer: 12 34", "1234", False), ("Answer: 1 2345", "12345", False),
    ("Answer: 2 1/2", "2.5", True),  # a mixed number is not a thousands group
])
def test_approximate_currency_root_and_grouped_digits(response, reference, expected):
    assert answers_match(final_answer(response), reference) is expected


# Questionable items: a range is no single value; different unit symbols on both sides are different quantities.
@pytest.mark.parametrize("response, reference, expected", [
    ("Answer: 3-4", "-1", False), ("Answer: 3-4", "3", False), ("Answer: 3–4", "4", False),
    ("Answer: 3-4", "3-4", True), ("Answer: 3 - 4", "-1", True),  # with spaces it is a subtraction
    ("Answer: -4", "-4", True),
    ("Answer: 10 m", "10 cm", False), ("Answer: 10 cm", "10 m", False), ("Answer: 5 kg", "5 g", False),
    ("Answer: 10 m", "10 m", True), ("Answer: 10 m", "10", True), ("Answer: 10", "10 m", True),
    ("Answer: 10 meters", "10 m", True), ("Answer: 120 km", "120", True),
])
def test_ranges_and_different_units(response, reference, expected):
    assert answers_match(final_answer(response), reference) is expected
