"""data_preparation.py through main([...]): schemas, splits, manifest, bad input."""

import json
from pathlib import Path

import pytest

import data_preparation as dp
import utils

FIXTURES = Path(__file__).parent / "fixtures"


def run(tmp_path, *args, out="out"):
    target = tmp_path / out
    code = dp.main(["--skip-upload", "--output-dir", str(target), *args])
    return code, target


def load(out):
    import datasets

    return datasets.load_from_disk(str(out))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sample_default_outputs(tmp_path):
    code, out = run(tmp_path, "--dataset", "sample", "--max-samples", "300")
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"dataset_dict.json", "train", "validation", "manifest.json", "preview.jsonl"}
    dd = load(out)
    m = json.loads((out / "manifest.json").read_text())
    assert len(dd["train"]) + len(dd["validation"]) == m["counts"]["kept_rows"]
    assert m["counts"]["validation"] == round(m["counts"]["kept_rows"] * 0.1)
    row = dd["train"][0]
    assert set(row) >= {"messages", "text", "answer", "domain", "sub-domain"}
    assert row["messages"][-1]["role"] == "assistant" and row["messages"][-1]["reasoning_content"]
    # Without --tokenizer the text column is a preview in the seed model's family (qwen2.5).
    assert row["text"] == utils.render_chat(row["messages"], template="qwen2.5")
    assert row["answer"] and row["messages"][-1]["content"] == f"Answer: {row['answer']}"
    assert m["content_sha256"] and m["chat_template"]["name"] == "qwen2.5 (preview only)"
    assert len((out / "preview.jsonl").read_text().splitlines()) == 5


def test_sample_answers_follow_from_worked_steps():
    from reasonforge import sample_data

    rows = sample_data.sample_rows(70, seed=3)
    assert len({r["sub-domain"] for r in rows}) == len(sample_data.FAMILIES)
    for r in rows:
        assert r["answer"] in r["reasoning"].splitlines()[-1]
    assert sample_data.sample_rows(20, seed=3) == rows[:20]


def test_split_is_deterministic_for_a_seed(tmp_path):
    _, a = run(tmp_path, "--dataset", "sample", "--max-samples", "200", "--seed", "7", out="a")
    _, b = run(tmp_path, "--dataset", "sample", "--max-samples", "200", "--seed", "7", out="b")
    _, c = run(tmp_path, "--dataset", "sample", "--max-samples", "200", "--seed", "8", out="c")
    ha, hb, hc = (json.loads((x / "manifest.json").read_text())["content_sha256"] for x in (a, b, c))
    assert ha == hb and ha != hc
    assert load(a)["validation"]["text"] == load(b)["validation"]["text"]


def test_seed_dataset_schema(tmp_path):
    code, out = run(tmp_path, "--dataset", str(FIXTURES / "turing_open_reasoning_schema.json"), "--include-code")
    assert code == 0
    dd = load(out)
    row = next(r for r in dd["train"]) if len(dd["train"]) else dd["validation"][0]
    assert set(row) >= {"conversation_id", "domain", "sub-domain", "answer", "messages", "text"}
    src = {r["conversation_id"]: r for r in json.loads((FIXTURES / "turing_open_reasoning_schema.json").read_text())}
    orig = src[row["conversation_id"]]
    assert row["messages"][0] == {"role": "user", "content": orig["question"], "reasoning_content": None}
    assert row["messages"][1]["content"].startswith(orig["answer"]) and "```python" in row["messages"][1]["content"]
    assert row["answer"] == orig["answer"]
    assert json.loads((out / "manifest.json").read_text())["schema"] == "question/answer"


SCHEMAS = {
    "openai-messages": ([{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": f"q{i}"},
                                       {"role": "assistant", "content": f"a{i}"}]} for i in range(10)], "messages"),
    "sharegpt": ([{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
                  for i in range(10)], "conversations"),
    "alpaca": ([{"instruction": f"q{i}", "input": "ctx" if i % 2 else "", "output": f"a{i}"} for i in range(10)], "alpaca"),
    "qa-reasoning": ([{"question": f"q{i}", "reasoning": f"r{i}", "answer": f"a{i}"} for i in range(10)], "question/answer"),
    "prompt-response": ([{"prompt": f"q{i}", "response": f"a{i}"} for i in range(10)], "prompt/response"),
    "prompt-completion": ([{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)], "prompt/completion"),
    "problem-solution": ([{"problem": f"q{i}", "solution": f"a{i}"} for i in range(10)], "problem/solution"),
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_each_schema_is_recognised(tmp_path, name):
    rows, schema = SCHEMAS[name]
    src = write_jsonl(tmp_path / "data.jsonl", rows)
    code, out = run(tmp_path, "--dataset", str(src), "--val-size", "0.2")
    assert code == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["schema"] == schema and m["counts"]["kept_rows"] == 10
    dd = load(out)
    for row in list(dd["train"]) + list(dd["validation"]):
        users = [x["content"] for x in row["messages"] if x["role"] == "user"]
        assts = [x for x in row["messages"] if x["role"] == "assistant"]
        i = users[0].split("\n")[0][1:]
        assert users[0].startswith(f"q{i}")
        assert assts[0]["content"].endswith(f"a{i}")
        if name == "alpaca" and int(i) % 2:
            assert users[0] == f"q{i}\n\nctx"
        if name == "qa-reasoning":
            assert assts[0]["reasoning_content"] == f"r{i}" and row["answer"] == f"a{i}"


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_csv_and_parquet_and_folder(tmp_path, ext):
    import pandas as pd

    folder = tmp_path / "src"
    folder.mkdir()
    for part in range(2):
        df = pd.DataFrame({"prompt": [f"q{part}-{i}" for i in range(6)], "response": [f"a{i}" for i in range(6)]})
        getattr(df, f"to_{ext}")(folder / f"part{part}.{ext}", index=False)
    code, out = run(tmp_path, "--dataset", str(folder))
    assert code == 0 and json.loads((out / "manifest.json").read_text())["counts"]["kept_rows"] == 12


def test_csv_answers_keep_the_text_of_the_file(tmp_path):
    """Type inference turned '007' into 7 and '1.50' into 1.5, and dropped 'NA' as missing."""
    src = tmp_path / "num.csv"
    answers = ["1.50", "007", "NA", "None", "12345678901234567890", "2.50", "-0", "1e3"]
    src.write_text("question,answer\n" + "".join(f"what is item {i}?,{a}\n" for i, a in enumerate(answers * 2)))
    code, out = run(tmp_path, "--dataset", str(src), "--val-size", "0.25")
    assert code == 0
    dd = load(out)
    got = {row["messages"][-2]["content"]: (row["messages"][-1]["content"], row["answer"])
           for split in dd.values() for row in split}
    for i, a in enumerate(answers * 2):
        assert got[f"what is item {i}?"] == (a, a)


def test_save_to_disk_folder_and_column_map(tmp_path):
    import datasets

    src = tmp_path / "disk"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"ask": [f"q{i}" for i in range(10)], "reply": [f"a{i}" for i in range(10)]})}).save_to_disk(str(src))
    code, out = run(tmp_path, "--dataset", str(src), "--column-map", "ask=user,reply=assistant", "--system-prompt", "SYS")
    assert code == 0
    row = load(out)["train"][0]
    assert row["messages"][0] == {"role": "system", "content": "SYS", "reasoning_content": None}


def test_dedupe_and_empty_rows(tmp_path):
    rows = [{"question": "same", "answer": "1"}] * 4 + [{"question": f"q{i}", "answer": str(i)} for i in range(8)]
    rows += [{"question": "no answer", "answer": ""}]
    code, out = run(tmp_path, "--dataset", str(write_jsonl(tmp_path / "d.jsonl", rows)), "--val-size", "0.25")
    m = json.loads((out / "manifest.json").read_text())
    assert code == 0 and m["duplicates_removed"] == 3 and m["dropped"] == {"duplicate": 3, "empty_or_missing_turn": 1}
    assert m["counts"]["kept_rows"] == 9


def test_token_lengths_with_real_tokenizer(tmp_path):
    from conftest import qwen_tokenizer_dir

    rows = [{"question": f"q{i} " + "word " * (5 if i % 3 else 200), "answer": str(i)} for i in range(12)]
    code, out = run(tmp_path, "--dataset", str(write_jsonl(tmp_path / "d.jsonl", rows)), "--tokenizer",
                    str(qwen_tokenizer_dir()), "--max-seq-length", "64", "--val-size", "0.2")
    m = json.loads((out / "manifest.json").read_text())
    assert code == 0 and m["dropped"]["too_long"] == 4 and m["counts"]["kept_rows"] == 8
    assert m["token_lengths"]["max"] <= 64 and m["token_lengths"]["min"] > 10


BAD = [
    (["--dataset", "{missing}"], "does not exist"),
    (["--val-size", "1.5"], "--val-size 1.5 must be between 0 and 1"),
    (["--val-size", "0"], "--val-size 0.0 must be between 0 and 1"),
    (["--dataset", "{unknown_schema}"], "--column-map text_in=user,label=assistant"),
    (["--dataset", "{malformed}"], "at line 3"),
    (["--dataset", "{empty}"], "empty"),
    (["--dataset", "{tiny}", "--val-size", "0.01"], "leave an empty split"),
    (["--dataset", "{tiny}", "--column-map", "nope=user,answer=assistant"], "not in the data"),
    # two columns to one role: all but one would vanish from every row without a count
    (["--dataset", "{tiny}", "--column-map", "question=user,extra=user,answer=assistant"], "maps question and extra all to user"),
    (["--s3-bucket", "Bad_Bucket"], "invalid S3 bucket name"),
    (["--s3-prefix", "datasets/mine"], "--s3-prefix datasets/mine needs --s3-bucket BUCKET"),
    (["--dataset", "s3://bucket/raw/train.jsonl"], "is on S3, which data preparation does not read; copy it here first"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_input_one_line_exit_2(tmp_path, capsys, argv, message):
    files = {
        "missing": tmp_path / "nope.jsonl",
        "unknown_schema": write_jsonl(tmp_path / "u.jsonl", [{"text_in": "a", "label": "b"}] * 3),
        "malformed": tmp_path / "m.jsonl",
        "empty": tmp_path / "e.jsonl",
        "tiny": write_jsonl(tmp_path / "t.jsonl", [{"question": f"q{i}", "answer": "a", "extra": "x"} for i in range(3)]),
    }
    files["malformed"].write_text('{"question": "a", "answer": "b"}\n{"question": "c", "answer": "d"}\n{"question": oops}\n')
    files["empty"].write_text("")
    argv = [a.format(**files) for a in argv]
    if "--dataset" not in argv:
        argv += ["--dataset", "sample", "--max-samples", "20"]
    code, out = run(tmp_path, *argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_interrupted_save_leaves_no_folder(tmp_path, monkeypatch):
    import datasets

    def boom(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", boom)
    code, out = run(tmp_path, "--dataset", "sample", "--max-samples", "50")
    assert code == 130 and not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_rerun_replaces_previous_output_whole(tmp_path):
    _, out = run(tmp_path, "--dataset", "sample", "--max-samples", "50")
    (out / "stale.txt").write_text("old")
    _, out = run(tmp_path, "--dataset", "sample", "--max-samples", "60")
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "manifest.json").read_text())["counts"]["input_rows"] == 60


def test_jsonl_answers_mixing_text_and_numbers_keep_the_text(tmp_path):
    """datasets types such a field as Json and parses its strings: "1.50" came back as 1.5, "null" as
    a missing answer (the row dropped) and "[1, 2]" as a list (the whole run refused)."""
    answers = ["1.50", 7, '"quoted"', "[1, 2]", "null", 2.5, "007", True]
    rows = [{"question": f"what is item {i}?", "answer": a} for i, a in enumerate(answers * 2)]
    src = write_jsonl(tmp_path / "mixed.jsonl", rows)
    code, out = run(tmp_path, "--dataset", str(src), "--val-size", "0.25")
    assert code == 0
    dd = load(out)
    got = {row["messages"][-2]["content"]: row["answer"] for split in dd.values() for row in split}
    expected = {"1.50": "1.50", 7: "7", '"quoted"': '"quoted"', "[1, 2]": "[1, 2]", "null": "null", 2.5: "2.5",
                "007": "007", True: "true"}
    assert got == {f"what is item {i}?": expected[a] for i, a in enumerate(answers * 2)}


def test_numbers_keep_the_files_digits(tmp_path):
    """datasets types a number column as int64 or float64: 12345678901234567890 was trained as
    12345678901234567168 and scored against 1.2345678901234567e+19, 10^400 became inf, 1.50 became 1.5."""
    huge = "1" + "0" * 400
    src = tmp_path / "numbers.jsonl"
    src.write_text("".join(f'{{"question": "Q{i}?", "answer": {a}}}\n'
                           for i, a in enumerate(["12345678901234567890", huge, "1.50", "-0.0", "7"] * 4)))
    code, out = run(tmp_path, "--dataset", str(src))
    assert code == 0
    dd = load(out)
    rows = [r for s in ("train", "validation") for r in dd[s]]
    answers = {r["answer"] for r in rows}
    assert answers == {"12345678901234567890", huge, "1.50", "-0.0", "7"}
    for r in rows:
        assert r["messages"][-1]["content"] == r["answer"]  # the trained target is the file's text too
    from reasonforge.answers import answers_match

    assert answers_match("12345678901234567890", "12345678901234567890")
    assert not answers_match("12345678901234567168", "12345678901234567890")


def test_a_file_mixing_schemas_is_refused_at_the_line_it_changes(tmp_path, capsys):
    src = tmp_path / "mixed.jsonl"
    write_jsonl(src, [{"question": "a?", "answer": "1"}, {"question": "b?", "answer": "2"},
                      {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}])
    assert dp.main(["--dataset", str(src), "--skip-upload", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "line 3 is a messages record" in err[0]
    assert "line 1 starts question/answer records" in err[0] and not (tmp_path / "o").exists()
    # across the files of one folder as well
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"instruction": "x", "output": "y"}])
    write_jsonl(folder / "b.jsonl", [{"prompt": "x", "response": "y"}])
    assert dp.main(["--dataset", str(folder), "--skip-upload", "--output-dir", str(tmp_path / "o")]) == 2
    assert "b.jsonl line 1 is a prompt/response record" in capsys.readouterr().err


def test_an_empty_json_array_says_so(tmp_path, capsys):
    src = tmp_path / "empty.json"
    src.write_text("[]")
    assert dp.main(["--dataset", str(src), "--skip-upload", "--output-dir", str(tmp_path / "o")]) == 2
    assert "is an empty JSON array; it holds no records" in capsys.readouterr().err


def test_nan_and_empty_answers_are_missing_and_keys_are_unique(tmp_path, capsys):
    src = tmp_path / "rows.jsonl"
    src.write_text('\ufeff{"question": "a?", "answer": NaN}\n{"question": "b?", "answer": "", "reasoning": "r"}\n'
                   + "".join(f'{{"question": "q{i}?", "answer": "{i}"}}\n' for i in range(6)), encoding="utf-8")
    code, out = run(tmp_path, "--dataset", str(src))  # the byte-order mark is read past
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dropped"] == {"empty_or_missing_turn": 2}  # NaN is missing; "" is not trained as "Answer: "
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"question": "a?", "answer": "1", "answer": "2"}\n')
    assert dp.main(["--dataset", str(dup), "--skip-upload", "--output-dir", str(tmp_path / "d")]) == 2
    assert "line 1 has the key 'answer' twice" in capsys.readouterr().err


def test_control_tokens_in_the_system_prompt_are_named(tmp_path, capsys):
    assert dp.main(["--dataset", "sample", "--max-samples", "20", "--skip-upload", "--output-dir", str(tmp_path / "o"),
                    "--system-prompt", "<|im_end|><|im_start|>system"]) == 2
    err = capsys.readouterr().err
    assert "--system-prompt holds a chat control token (<|im_end|>)" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("name, content, words", [
    ("wrap.json", '{\n  "data": [{"question": "a", "answer": "1"}]\n}\n', "records are under 'data'"),
    ("config.json", '{\n  "arguments": {"lora_r": 16}\n}\n', "is one JSON object, not records"),
    ("semi.csv", "question;answer\na;1\nb;2\n", "it looks ';'-separated"),
])
def test_files_of_another_shape_say_what_they_are(tmp_path, capsys, name, content, words):
    src = tmp_path / name
    src.write_text(content)
    assert dp.main(["--dataset", str(src), "--skip-upload", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


def test_a_file_whose_rows_are_all_dropped_says_why(tmp_path, capsys):
    src = write_jsonl(tmp_path / "empty.jsonl", [{"question": f"q{i}?", "answer": ""} for i in range(5)])
    assert dp.main(["--dataset", str(src), "--skip-upload", "--output-dir", str(tmp_path / "o")]) == 2
    assert "5 read, all dropped (5 empty_or_missing_turn)" in capsys.readouterr().err


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path, capsys):
    src = tmp_path / "dup.csv"
    src.write_text("question,question,answer\n" + "".join(f"Q{i}?,R{i}?,00{i}.50\n" for i in range(20)))
    code, out = run(tmp_path, "--dataset", str(src))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"error: {src} names the column 'question' more than once"), err[-2:]
    assert not out.exists()


def test_split_of_a_local_file_is_refused(tmp_path, capsys):
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"question": f"q{i}?", "answer": str(i)}) + "\n" for i in range(20)))
    code, out = run(tmp_path, "--dataset", str(src), "--split", "test")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "files have no splits); drop --split test" in err[-1] and not out.exists()


def test_split_of_the_built_in_sample_is_refused(tmp_path, capsys):
    code, out = run(tmp_path, "--dataset", "sample", "--split", "test")
    assert code == 2 and "the built-in sample has no splits" in capsys.readouterr().err and not out.exists()
