"""SIGTERM drills: a spot instance's two-minute notice, landing wherever it lands.

The training drills send a real SIGTERM to a real train_lora.py process (or, where the moment must
be exact, the process sends it to itself from a patched hook); the handler, the callbacks and the
Trainer's own checkpoint code all run as in production.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import data_preparation as dp
import train_lora
from reasonforge import callbacks, checkpoints, models, preemption
import utils

ROOT = Path(__file__).resolve().parents[1]


def launch(code: str, *args):
    """Run `code` (which ends by calling a script's main with sys.argv[1:]) in a fresh Python."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, proc, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def losses(run: Path) -> list[tuple[int, float]]:
    history = json.loads((run / "training_metrics.json").read_text())["history"]
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


def logged_steps(run: Path) -> list[int]:
    path = run / "logs" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def train_argv(model, data, out, *extra):
    return ["--model-name", str(model), "--dataset-path", str(data), "--output-dir", str(out), "--max-steps", "16",
            "--save-steps", "100", "--batch-size", "4", "--gradient-accumulation-steps", "1", "--learning-rate", "5e-3",
            "--seed", "5", *map(str, extra)]


TRAIN = "import sys, train_lora; sys.exit(train_lora.main(sys.argv[1:]))"


@pytest.mark.slow
@pytest.mark.s3
def test_sigterm_mid_training_checkpoints_locally_and_on_s3_and_resumes_to_same_losses(tmp_path, tiny_model,
                                                                                         sample_dataset, s3_env):
    full = tmp_path / "full"
    assert train_lora.main(train_argv(tiny_model, sample_dataset, full)) == 0

    run = tmp_path / "spot"
    proc = launch(TRAIN, *train_argv(tiny_model, sample_dataset, run, "--s3-bucket", s3_env, "--run-name", "spot"))
    assert wait_for(lambda: len(logged_steps(run)) >= 3, proc), proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, out[-3000:]
    step = max(logged_steps(run))
    assert 3 <= step < 16
    ckpt = run / f"checkpoint-{step}"
    assert checkpoints.checkpoint_problem(ckpt) is None  # complete, with the marker
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_config.json"} <= {
        p.name for p in ckpt.iterdir()}
    assert not (run / "final_model").exists()
    run_uri = utils.S3Uri(s3_env, "adapters/spot")
    assert checkpoints.s3_complete_checkpoints(run_uri) == [step]
    remote = utils.list_s3_objects(utils.s3_client(), run_uri.join("checkpoints", ckpt.name))
    assert set(remote) == {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert f"stopped by SIGTERM at step {step}: checkpoint saved to {ckpt}" in out
    command = out.split("resume with:\n", 1)[1].splitlines()[0].strip()
    assert command.endswith("--resume-from-checkpoint latest")

    shutil.rmtree(run)  # the instance is gone: the resume comes from S3 alone
    resume_argv = shlex.split(command)[2:]  # drop "python train_lora.py"
    assert train_lora.main(resume_argv) == 0
    assert min(logged_steps(run)) == step + 1  # continued, not restarted
    a, b = losses(full), losses(run)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 17))
    # Tolerance 1e-4 relative, as the other resume drills: same data order, optimizer, scheduler and RNG.
    assert [loss for _, loss in b] == pytest.approx([loss for _, loss in a], rel=1e-4)


SLOW_EVALUATION = """
import pathlib, sys, time, train_lora
from reasonforge import callbacks
marker = pathlib.Path(sys.argv.pop(1))
original = callbacks.StopOnSigterm.on_prediction_step
def slow(self, args, state, control, **kw):
    marker.touch()
    time.sleep(0.5)  # a long validation pass: the signal lands inside it
    return original(self, args, state, control, **kw)
callbacks.StopOnSigterm.on_prediction_step = slow
sys.exit(train_lora.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_during_evaluation_checkpoints_that_step(tmp_path, tiny_model, sample_dataset):
    run, marker = tmp_path / "run", tmp_path / "evaluating"
    proc = launch(SLOW_EVALUATION, marker, *train_argv(tiny_model, sample_dataset, run, "--save-steps", "4"))
    assert wait_for(marker.exists, proc), proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, out[-3000:]
    assert f"stopped by SIGTERM at step 4: checkpoint saved to {run / 'checkpoint-4'}" in out
    assert checkpoints.checkpoint_problem(run / "checkpoint-4") is None
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4"]
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and max(h["step"] for h in state["log_history"]) == 4
    # The resume point: latest picks it.
    assert checkpoints.resolve_resume("latest", run, run_uri=None) == str(run / "checkpoint-4")


@pytest.mark.slow
@pytest.mark.s3
def test_sigterm_during_checkpoint_upload_stops_on_that_checkpoint(tmp_path, tiny_model, sample_dataset, s3_env,
                                                                    monkeypatch, capsys):
    real_upload = checkpoints.upload_checkpoint

    def upload_then_signal(ckpt, run_uri):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the upload is under way
        real_upload(ckpt, run_uri)

    monkeypatch.setattr(checkpoints, "upload_checkpoint", upload_then_signal)
    run = tmp_path / "run"
    code = train_lora.main(train_argv(tiny_model, sample_dataset, run, "--save-steps", "4", "--s3-bucket", s3_env,
                                      "--run-name", "upl"))
    err = capsys.readouterr().err
    assert code == 143
    assert f"stopped by SIGTERM at step 4: checkpoint saved to {run / 'checkpoint-4'} and s3://{s3_env}/adapters/upl" in err
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4"]  # no second save, no step 5
    assert checkpoints.s3_complete_checkpoints(utils.S3Uri(s3_env, "adapters/upl")) == [4]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back as it was
    # The watchdog stood down with the loop: alive, it would end this process 90 s later.
    import threading

    assert not [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t.is_alive()]


SLOW_FIRST_STEP = """
import pathlib, sys, time, train_lora
from reasonforge import callbacks
marker = pathlib.Path(sys.argv.pop(1))
def compiling(self, args, state, control, **kw):
    if state.global_step == 0:
        marker.touch()
        time.sleep(120)  # the first step's compile on a fresh GPU instance
callbacks.StepLogger.on_step_begin = compiling
sys.exit(train_lora.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_watchdog_exits_when_the_first_step_outlasts_the_deadline(tmp_path, tiny_model, sample_dataset):
    run, marker = tmp_path / "run", tmp_path / "compiling"
    proc = launch(SLOW_FIRST_STEP, marker, *train_argv(tiny_model, sample_dataset, run, "--sigterm-deadline-s", "2"))
    assert wait_for(marker.exists, proc), proc.communicate()[0][-3000:]
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, out[-3000:]
    assert time.time() - sent < 60  # not the 120 s "compile"
    assert "no checkpoint could begin within 2 s" in out and "no checkpoint of this run exists yet" in out
    assert "--resume-from-checkpoint latest" in out
    assert not list(run.glob("checkpoint-*"))


def test_sigterm_before_training_stops_at_once_with_the_resume_command(tmp_path, tiny_model, sample_dataset,
                                                                       monkeypatch, capsys):
    def load_then_signal(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM should have stopped the model load")

    monkeypatch.setattr(models, "load_model", load_then_signal)
    code = train_lora.main(train_argv(tiny_model, sample_dataset, tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 143 and "stopped by SIGTERM before the training loop began" in err
    assert "resume with:\n  python train_lora.py --model-name" in err and err.rstrip().endswith("--resume-from-checkpoint latest")


def test_resume_command_replaces_any_resume_flag():
    cmd = preemption.resume_command(["--output-dir", "out dir", "--resume-from-checkpoint", "ckpt", "--lora-r", "8"])
    assert cmd == "python train_lora.py --output-dir 'out dir' --lora-r 8 --resume-from-checkpoint latest"
    cmd = preemption.resume_command(["--resume-from-checkpoint=x", "--seed", "1"])
    assert cmd == "python train_lora.py --seed 1 --resume-from-checkpoint latest"


SLOW_SAVE = """
import pathlib, sys, time, datasets, data_preparation
marker = pathlib.Path(sys.argv.pop(1))
original = datasets.DatasetDict.save_to_disk
def slow(self, *a, **k):
    original(self, *a, **k)
    marker.touch()
    time.sleep(120)
datasets.DatasetDict.save_to_disk = slow
sys.exit(data_preparation.main(sys.argv[1:]))
"""


def test_data_preparation_sigterm_leaves_no_partial_folder(tmp_path):
    out, marker = tmp_path / "prepared", tmp_path / "saving"
    proc = launch(SLOW_SAVE, marker, "--dataset", "sample", "--max-samples", "50", "--skip-upload", "--output-dir", out)
    assert wait_for(marker.exists, proc), proc.communicate()[0][-3000:]
    partial = list(tmp_path.glob(".prepared.partial-*"))
    assert len(partial) == 1 and (partial[0] / "dataset_dict.json").is_file()
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=60)[0]
    assert proc.returncode == 143, text[-2000:]
    assert "stopped by SIGTERM" in text and "Traceback" not in text
    assert not out.exists() and not list(tmp_path.glob(".prepared.*"))


def test_stale_partial_folders_are_removed_by_the_next_run(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".prepared.partial-{dead.pid}-abc123"  # a SIGKILLed run's scratch folder
    legacy = tmp_path / ".prepared.partial-k2j4_x"  # older name, no pid, from before this run
    live = tmp_path / f".prepared.partial-{os.getppid()}-zzz999"  # a run still going
    reused = tmp_path / f".prepared.partial-{os.getpid()}-yyy888"  # a killed run whose pid a newer process has
    for folder in (stale, legacy, live, reused):
        folder.mkdir()
        (folder / "train").mkdir()
    old = time.time() - 3600
    os.utime(legacy, (old, old))
    os.utime(reused, (old, old))
    assert dp.main(["--dataset", "sample", "--max-samples", "50", "--skip-upload", "--output-dir",
                    str(tmp_path / "prepared")]) == 0
    assert not stale.exists() and not legacy.exists() and not reused.exists()
    assert live.is_dir()
    assert (tmp_path / "prepared" / "manifest.json").is_file()


def test_sigterm_deadline_must_be_positive(tmp_path, capsys):
    code = train_lora.main(["--output-dir", str(tmp_path / "o"), "--sigterm-deadline-s", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == "error: --sigterm-deadline-s 0.0 must be positive, e.g. 90"
