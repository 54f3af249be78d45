"""Output locations: what a user keeps there is never replaced, and two runs cannot share a run folder."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import data_preparation as dp
import evaluate_model as ev
import test_model as tm
import train_lora
import utils
from conftest import ROOT, one_error_line, train_argv


def user_folder(root: Path) -> Path:
    folder = root / "mydocs"
    (folder / "photos").mkdir(parents=True)
    (folder / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not really")
    (folder / "thesis.txt").write_text("four years of work")
    return folder


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------
# 1. Never destroy user data
# ---------------------------------------------------------------------------------------------


def test_data_preparation_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    mine = user_folder(tmp_path)
    before = snapshot(mine)
    assert dp.main(["--dataset", "sample", "--max-samples", "20", "--output-dir", str(mine)]) == 2
    line = one_error_line(capsys)
    assert str(mine) in line and "photos/, thesis.txt" in line and "choose another --output-dir or remove it" in line
    assert snapshot(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydocs"]  # no scratch folder left beside it


@pytest.mark.parametrize("target,message", [
    ("file", "is an existing file"),
    (".", "is the working folder"),
    ("", "--output-dir is empty"),
    ("file/sub", "is a file, not a folder"),
    ("loop", "symlink loop"),
    ("loop/sub", "symlink loop"),
])
def test_data_preparation_output_dir_shapes(tmp_path, monkeypatch, capsys, target, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("keep me")
    os.symlink("loop", tmp_path / "loop")
    (tmp_path / "keep.txt").write_text("keep me too")
    assert dp.main(["--dataset", "sample", "--max-samples", "20", "--output-dir", target]) == 2
    assert message in one_error_line(capsys)
    assert (tmp_path / "file").read_text() == "keep me" and (tmp_path / "keep.txt").read_text() == "keep me too"


def test_own_outputs_are_still_replaced(tmp_path, capsys):
    out = tmp_path / "prepared"
    assert dp.main(["--dataset", "sample", "--max-samples", "30", "--output-dir", str(out)]) == 0
    assert dp.main(["--dataset", "sample", "--max-samples", "40", "--output-dir", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["counts"]["input_rows"] == 40
    empty = tmp_path / "empty"
    empty.mkdir()
    assert dp.main(["--dataset", "sample", "--max-samples", "30", "--output-dir", str(empty)]) == 0


def test_atomic_directory_asks_its_caller_what_is_ours(tmp_path):
    mine = user_folder(tmp_path)
    with pytest.raises(utils.UserError, match="is not a thing of ours"):
        with utils.atomic_directory(mine, lambda f: False, "a thing of ours"):
            raise AssertionError("the block must not run")
    # Something of the user's appearing while the block runs is kept too, and so is the new output.
    late = tmp_path / "late"
    with pytest.raises(utils.UserError, match=r"the new output is in .*\.late\.partial-"):
        with utils.atomic_directory(late, lambda f: False, "a thing of ours") as tmp:
            (tmp / "result.txt").write_text("new")
            late.mkdir()
            (late / "notes.txt").write_text("user's")
    assert (late / "notes.txt").read_text() == "user's"
    with utils.atomic_directory(late, lambda f: (f / "notes.txt").is_file(), "a thing of ours") as tmp:
        (tmp / "result.txt").write_text("newer")
    assert [p.name for p in late.iterdir()] == ["result.txt"]


def test_demo_model_export_refuses_a_user_folder_before_loading(tmp_path, monkeypatch):
    mine = user_folder(tmp_path)
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: pytest.fail("got as far as loading the GGUF"))
    with pytest.raises(utils.UserError, match="is not a demo model export"):
        utils.export_demo_model(mine)


def test_train_refuses_a_folder_that_is_not_a_run(tmp_path, tiny_model, sample_dataset, no_model_load, capsys):
    mine = user_folder(tmp_path)
    before = snapshot(mine)
    assert train_lora.main(train_argv(tiny_model, sample_dataset, mine)) == 2
    line = one_error_line(capsys)
    assert "is not a train_lora.py run folder" in line and "thesis.txt" in line
    assert snapshot(mine) == before


def test_train_refuses_a_user_folder_named_final_model(tmp_path, tiny_model, sample_dataset, no_model_load, capsys):
    run = tmp_path / "run"
    (run / "final_model").mkdir(parents=True)
    (run / "training_config.json").write_text("{}")
    (run / "final_model" / "notes.md").write_text("mine")
    assert train_lora.main(train_argv(tiny_model, sample_dataset, run)) == 2
    assert "final_model already exists and is not an adapter saved by train_lora.py" in one_error_line(capsys)
    assert (run / "final_model" / "notes.md").read_text() == "mine"


BAD_REPORT_TARGETS = [
    ("folder", "is a folder; name a file"),
    ("notes.txt", "already exists and is not a report written by"),
    ("other.json", "already exists and is not a report written by"),
    ("notes.txt/report.json", "is a file, not a folder"),
    ("/sys/rf-reports/report.json", "cannot write in /sys"),
]


@pytest.mark.parametrize("target,message", BAD_REPORT_TARGETS)
def test_evaluate_and_chat_refuse_an_output_file_before_loading(tmp_path, sample_dataset, no_model_load, capsys,
                                                                target, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "other.json").write_text('{"some": "other tool"}')
    out = target if target.startswith("/") else str(tmp_path / target)
    assert ev.main(["--model-path", str(tmp_path), "--dataset-path", str(sample_dataset), "--output-file", out]) == 2
    assert message in one_error_line(capsys)
    assert tm.main(["--model-path", str(tmp_path), "--instruction", "hi", "--output-file", out]) == 2
    assert message in one_error_line(capsys)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# 2. Two runs, one folder
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_second_run_into_the_same_folder_is_refused(tmp_path, tiny_model, sample_dataset, capsys):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    first = subprocess.Popen([sys.executable, str(ROOT / "train_lora.py"),
                              *train_argv(tiny_model, sample_dataset, out, "--max-steps", "6", "--save-steps", "3")],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = out / utils.RunLock.NAME
    deadline = time.time() + 300
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock.exists(), first.communicate()[0][-2000:]
    code = train_lora.main(train_argv(tiny_model, sample_dataset, out))
    line = one_error_line(capsys)
    assert code == 2 and f"pid {first.pid} on {socket.gethostname()}" in line and "is in use by another run" in line
    output = first.communicate(timeout=600)[0]
    assert first.returncode == 0, output[-2000:]
    assert not lock.exists()
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["global_step"] == 6
    steps = [json.loads(l)["step"] for l in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # one writer: nothing interleaved


def test_live_holder_is_named_before_the_model_loads(tmp_path, tiny_model, sample_dataset, no_model_load, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (out / utils.RunLock.NAME).write_text(json.dumps({"pid": holder.pid, "hostname": socket.gethostname(),
                                                          "started": "2026-01-01T00:00:00Z"}))
        assert train_lora.main(train_argv(tiny_model, sample_dataset, out)) == 2
        line = one_error_line(capsys)
        assert f"pid {holder.pid}" in line and f"delete {out / utils.RunLock.NAME}" in line
    finally:
        holder.kill()
        holder.wait()
    assert (out / utils.RunLock.NAME).exists()  # someone else's lock is left alone


def test_stale_lock_is_taken_over_and_released(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = tmp_path / utils.RunLock.NAME
    lock.write_text(json.dumps({"pid": dead.pid, "hostname": socket.gethostname(), "started": "x"}))
    held = utils.RunLock(tmp_path).acquire()
    assert f"left by pid {dead.pid}" in caplog.text and "no longer runs" in caplog.text
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    held.release()
    assert not lock.exists()
    # From another machine it cannot be checked, so it is not taken.
    lock.write_text(json.dumps({"pid": 1, "hostname": "elsewhere", "started": "x"}))
    with pytest.raises(utils.UserError, match="pid 1 on elsewhere"):
        utils.RunLock(tmp_path).acquire()


def test_lock_is_released_when_the_run_fails(tmp_path, tiny_model, sample_dataset, capsys):
    out = tmp_path / "run"
    assert train_lora.main(train_argv(tiny_model, tmp_path / "no-data", out)) == 2
    assert "does not exist" in one_error_line(capsys)
    # the folder the failed run created held only its lock: both are gone (a run that wrote something keeps it)
    assert not (out / utils.RunLock.NAME).exists() and not out.exists()


def test_atomic_writes_get_a_plain_files_mode(tmp_path):
    """Reports were written owner-only (mkstemp's 0600): a colleague on a shared box could not read them."""
    import os
    import stat

    from reasonforge.core import atomic_write_text

    old = os.umask(0o022)
    try:
        new = tmp_path / "report.json"
        atomic_write_text(new, "{}")
        assert stat.S_IMODE(new.stat().st_mode) == 0o644
        kept = tmp_path / "shared.json"
        kept.write_text("{}")
        kept.chmod(0o664)
        atomic_write_text(kept, '{"a": 1}')  # a replaced file keeps the mode it had
        assert stat.S_IMODE(kept.stat().st_mode) == 0o664 and kept.read_text() == '{"a": 1}'
    finally:
        os.umask(old)
