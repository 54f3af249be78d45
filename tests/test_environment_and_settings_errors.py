"""Environment failures and bad settings end in one `error:` line; diverged or damaged runs are named."""

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import data_preparation as dp
import evaluate_model as ev
import test_model as tm
import train_lora
from reasonforge import checkpoints, sft
import utils
from conftest import S3_KEY_ID, S3_SECRET, one_error_line, train_argv


# ---------------------------------------------------------------------------------------------
# 1. The environment's failures as one line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env,message", [
    ({"AWS_ENDPOINT_URL": "not a url"}, "AWS_ENDPOINT_URL='not a url' is not a usable S3 endpoint"),
    ({"AWS_ENDPOINT_URL": "ftp://example.com"}, "AWS_ENDPOINT_URL='ftp://example.com' is not a usable S3 endpoint"),
    ({"AWS_PROFILE": "no-such-profile"}, "AWS profile 'no-such-profile' (AWS_PROFILE) is not in"),
    ({"AWS_SHARED_CREDENTIALS_FILE": "{bad}"}, "cannot parse the AWS config file"),
    ({"AWS_CONFIG_FILE": "{bad}"}, "cannot parse the AWS config file"),
    ({"AWS_DEFAULT_REGION": "not a region!"}, "AWS region 'not a region!' is not a region name"),
    ({"RF_S3_MAX_ATTEMPTS": "many"}, "RF_S3_MAX_ATTEMPTS='many' must be a whole number"),
])
def test_s3_settings_that_cannot_work(s3_env, tmp_path, monkeypatch, capsys, env, message):
    bad = tmp_path / "credentials"
    bad.write_text("[default\naws_access_key_id = x\n")
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(bad=bad))
    if "AWS_PROFILE" in env:
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    out = tmp_path / "prepared"
    assert dp.main(["--dataset", "sample", "--max-samples", "20", "--output-dir", str(out), "--s3-bucket", s3_env]) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()  # refused before the work


@pytest.mark.slow
def test_an_endpoint_that_never_answers_fails_within_a_minute(tmp_path, monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = []

    def accept_and_say_nothing():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("RF_S3_MAX_ATTEMPTS", raising=False)  # the defaults are what is measured
    start = time.monotonic()
    try:
        with pytest.raises(utils.UserError, match="did not answer within"):
            utils.check_s3_bucket("rf-silent", "upload")
    finally:
        server.close()
        for conn in held:
            conn.close()
    assert time.monotonic() - start < 60
    assert len(held) == utils.S3_MAX_ATTEMPTS


@pytest.mark.s3
def test_single_file_uploads_go_through_the_translator(s3_env, tmp_path, monkeypatch):
    f = tmp_path / "training_metrics.json"
    f.write_text("{}")
    utils.upload_file(f, utils.S3Uri(s3_env, "adapters/r/training_metrics.json"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(utils.UserError, match=f"S3 rejected the credentials for s3://{s3_env} .SignatureDoesNotMatch"):
        utils.upload_file(f, utils.S3Uri(s3_env, "adapters/r/training_metrics.json"))


@pytest.fixture
def small_mount(tmp_path):
    """A real 256 KiB tmpfs, so full-disk and read-only errors come from the kernel, not a mock."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs privileges this machine does not give")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_while_saving_is_one_line(small_mount, capsys):
    out = small_mount / "prepared"
    assert dp.main(["--dataset", "sample", "--max-samples", "2000", "--output-dir", str(out)]) == 2
    line = one_error_line(capsys)
    assert f"cannot write {out}: No space left on device; free some space" in line
    assert not out.exists() and not list(small_mount.iterdir())  # the scratch folder went too


@pytest.mark.slow
def test_full_disk_during_training_is_one_line(small_mount, tiny_model, sample_dataset, capsys):
    out = small_mount / "run"
    assert train_lora.main(train_argv(tiny_model, sample_dataset, out, "--max-steps", "4")) == 2
    # The tokenizer's Rust writer or torch.save fail first; neither raises an OSError.
    assert one_error_line(capsys) == (f"error: cannot write to {out}: No space left on device; free some space or "
                                      "choose an output location on another disk")
    assert not (out / utils.RunLock.NAME).exists() and not (out / "final_model").exists()


def test_native_and_chained_environment_errors():
    import errno

    assert utils.describe_environment_error(Exception("No space left on device (os error 28)")) == (
        "cannot write to an output file: No space left on device; free some space or choose an output location on "
        "another disk")
    try:
        try:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/x")
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as outer:
        assert utils.describe_environment_error(outer).startswith("cannot use /data/x: Permission denied")
    assert utils.describe_environment_error(RuntimeError("unexpected pos 704 vs 598")) is None  # no lock, no disk


def test_gpu_out_of_memory_is_one_line_that_names_the_fixes(tmp_path, tiny_model, sample_dataset, capsys, monkeypatch):
    """A CUDA OOM in the training loop (the kept-layer plan misjudged, or another process took the
    memory) ends in one line naming the leaner setting and the resume, not a traceback."""
    import torch
    import transformers

    def oom(self, *a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                          "capacity of 22.06 GiB of which 1.12 GiB is free.")

    monkeypatch.setattr(transformers.Trainer, "train", oom)
    out = tmp_path / "run"
    assert train_lora.main(train_argv(tiny_model, sample_dataset, out)) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)")
    assert "--gradient-checkpointing unsloth" in line and "--resume-from-checkpoint latest" in line
    assert not (out / "final_model").exists() and not (out / utils.RunLock.NAME).exists()
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 MiB")
    assert utils.describe_environment_error(wrapped).startswith("the GPU ran out of memory")


def test_read_only_location_is_refused_up_front(small_mount, tmp_path, sample_dataset, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    assert dp.main(["--dataset", "sample", "--max-samples", "20", "--output-dir", str(small_mount / "p")]) == 2
    line = one_error_line(capsys)
    assert f"cannot write in {small_mount} (Read-only file system)" in line
    assert ev.main(["--model-path", str(tmp_path), "--dataset-path", str(sample_dataset),
                    "--output-file", str(small_mount / "e.json")]) == 2
    assert "(Read-only file system)" in one_error_line(capsys)


def test_oserror_from_a_write_is_translated_by_cli_entry(capsys):
    import errno

    @utils.cli_entry
    def main(argv=None):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/data/out/manifest.json")

    assert main([]) == 2
    assert one_error_line(capsys) == ("error: cannot use /data/out/manifest.json: Read-only file system; "
                                      "that file system is read-only; choose a writable output location")

    @utils.cli_entry
    def buggy(argv=None):
        raise OSError("an OSError with no errno is a bug, not an environment")

    with pytest.raises(OSError):
        buggy([])


def test_corrupt_save_to_disk_source(tmp_path, capsys):
    broken = tmp_path / "saved"
    broken.mkdir()
    (broken / "dataset_info.json").write_text("{not json")
    assert dp.main(["--dataset", str(broken), "--output-dir", str(tmp_path / "o")]) == 2
    assert f"cannot load the save_to_disk folder {broken}" in one_error_line(capsys)


@pytest.mark.parametrize("content", ["\x00\x01garbage{", "[1, 2]", ""])
def test_garbage_manifest(tmp_path, sample_dataset, tiny_model, no_model_load, capsys, content):
    data = tmp_path / "data"
    shutil.copytree(sample_dataset, data)
    (data / "manifest.json").write_text(content)
    assert train_lora.main(train_argv(tiny_model, data, tmp_path / "run")) == 2
    line = one_error_line(capsys)
    assert f"dataset manifest {data / 'manifest.json'}" in line and "prepare the dataset again" in line
    assert ev.main(["--model-path", str(tiny_model), "--dataset-path", str(data), "--output-file", str(tmp_path / "e.json")]) == 2
    assert "dataset manifest" in one_error_line(capsys)


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory, tiny_model, sample_dataset):
    """8 steps, checkpoints at 4 and 8, and its final_model."""
    out = tmp_path_factory.mktemp("ckrun") / "run"
    assert train_lora.main(train_argv(tiny_model, sample_dataset, out, "--max-steps", "8", "--save-steps", "4",
                                      "--eval-steps", "4", "--num-epochs", "1")) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adapter_config.json", utils.RUN_INFO_FILE])
def test_garbage_adapter_metadata(tmp_path, checkpointed_run, name, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(checkpointed_run / "final_model", adapter)
    (adapter / name).write_text("garbage]")
    assert tm.main(["--model-path", str(adapter), "--instruction", "hi", "--output-file", str(tmp_path / "o.json")]) == 2
    line = one_error_line(capsys)
    assert f"{adapter / name} is not valid JSON (line 1, column 1" in line and "copy the adapter folder again" in line


# ---------------------------------------------------------------------------------------------
# 2. Settings that cannot work, refused before anything heavy loads
# ---------------------------------------------------------------------------------------------

BAD_TRAIN = [
    (["--weight-decay", "nan"], "--weight-decay nan is not a finite number; it must be in [0, 1]"),
    (["--num-epochs", "nan", "--max-steps", "-1"], "--num-epochs nan is not a finite number; it must be > 0"),
    (["--num-epochs", "inf", "--max-steps", "-1"], "--num-epochs inf is not a finite number"),
    (["--learning-rate", "inf"], "--learning-rate inf is not a finite number; it must be in (0, 1)"),
    (["--lora-dropout", "nan"], "--lora-dropout nan is not a finite number"),
    (["--gpu-memory-gib", "nan"], "--gpu-memory-gib nan is not a finite number; it must be a positive number of GiB"),
    (["--gpu-memory-gib", "-4"], "--gpu-memory-gib -4.0 must be a positive number of GiB"),
    (["--seed", "-5"], "--seed -5 must be from 0 to 4294967295"),
    (["--seed", str(2**32)], "--seed 4294967296 must be from 0 to 4294967295"),
    (["--max-steps", "0"], "--max-steps 0 must be a positive number of steps, or -1"),
    (["--warmup-steps", "-1"], "--warmup-steps -1 must be 0 or more"),
    (["--early-stopping-patience", "0"], "--early-stopping-patience 0 must be at least 1"),
    (["--lr-scheduler", "bogus"], "--lr-scheduler 'bogus' is unknown; choose one of linear, cosine"),
    (["--lr-scheduler", "cosine_with_min_lr"], "needs scheduler arguments this script does not pass"),
    (["--optim", "adamw"], "--optim 'adamw' is unknown; did you mean"),
    (["--run-name", "../escape", "--s3-bucket", "rf-bucket"], "--run-name '../escape' has an empty, '.' or '..' part"),
    (["--run-name", "a\tb", "--s3-bucket", "rf-bucket"], "--run-name 'a\\tb' holds control characters"),
    (["--run-name", "a//b"], "--run-name 'a//b' has an empty"),
    (["--run-name", ""], "--run-name '' is empty"),
    (["--resume-from-checkpoint", "/no/such/checkpoint-4"], "'/no/such/checkpoint-4' is not a folder; pass a checkpoint-N"),
    # the default backend (auto) becomes hf on a machine without CUDA: known before the model loads
    (["--cuda-graphs", "on"], "--cuda-graphs on: the hf backend has no compiled blocks (backend hf: no CUDA GPU"),
]


@pytest.mark.parametrize("extra,message", BAD_TRAIN)
def test_train_settings_that_cannot_work(tmp_path, tiny_model, sample_dataset, no_model_load, capsys, extra, message):
    assert train_lora.main(train_argv(tiny_model, sample_dataset, tmp_path / "run", *extra)) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "run" / "final_model").exists()


def test_train_collects_every_problem_in_one_line(tmp_path, tiny_model, sample_dataset, no_model_load, capsys):
    argv = train_argv(tiny_model, sample_dataset, tmp_path / "run", "--weight-decay", "nan", "--seed", "-1",
                      "--learning-rate", "nan")
    assert train_lora.main(argv) == 2
    line = one_error_line(capsys)
    assert "--weight-decay nan" in line and "--seed -1" in line and "--learning-rate nan" in line


@pytest.mark.parametrize("extra,message", [
    (["--seed", "-5"], "--seed -5 must be from 0"),
    (["--s3-prefix", "a//b", "--s3-bucket", "rf-bucket"], "--s3-prefix 'a//b' has an empty"),
    (["--s3-prefix", "runs/\nx", "--s3-bucket", "rf-bucket"], "holds control characters"),
    (["--val-size", "inf"], "--val-size inf must be between 0 and 1"),
])
def test_data_preparation_settings(tmp_path, capsys, extra, message):
    assert dp.main(["--dataset", "sample", "--max-samples", "20", "--output-dir", str(tmp_path / "o"), *extra]) == 2
    assert message in one_error_line(capsys)


@pytest.mark.parametrize("extra,message", [
    (["--seed", "-1"], "--seed -1 must be from 0"),
    (["--max-seq-length", "0"], "--max-seq-length 0 must be a positive integer"),
    (["--temperature", "nan"], "--temperature nan must be between 0"),
    (["--top-p", "inf"], "--top-p inf must be in (0, 1]"),
])
def test_inference_settings(tmp_path, sample_dataset, no_model_load, capsys, extra, message):
    out = str(tmp_path / "o.json")
    assert ev.main(["--model-path", str(tmp_path), "--dataset-path", str(sample_dataset), "--output-file", out, *extra]) == 2
    assert message in one_error_line(capsys)
    assert tm.main(["--model-path", str(tmp_path), "--instruction", "hi", "--output-file", out, *extra]) == 2
    assert message in one_error_line(capsys)


@pytest.mark.slow
def test_max_new_tokens_beyond_the_context(tmp_path, checkpointed_run, sample_dataset, capsys):
    out = tmp_path / "o.json"
    # The tiny model's positions end at 2048.
    assert tm.main(["--model-path", str(checkpointed_run / "final_model"), "--instruction", "hi",
                    "--max-new-tokens", "4000", "--output-file", str(out)]) == 2
    assert "--max-new-tokens 4000 does not fit the model's context of 2048 tokens" in one_error_line(capsys)
    assert ev.main(["--model-path", str(checkpointed_run / "final_model"), "--dataset-path", str(sample_dataset),
                    "--max-new-tokens", "2048", "--output-file", str(out)]) == 2
    assert "does not fit the model's context" in one_error_line(capsys)
    assert not out.exists()


def test_prompt_plus_reply_is_clipped_to_the_context(caplog):
    class Model:
        class config:
            max_position_embeddings = 100

    kwargs = {"max_new_tokens": 64, "do_sample": False}
    assert utils.fit_to_context(Model, 30, kwargs) is kwargs
    assert utils.fit_to_context(Model, 60, kwargs) == {"max_new_tokens": 40, "do_sample": False}
    assert "generating at most 40 tokens" in caplog.text
    with pytest.raises(utils.UserError, match="a prompt of 100 tokens fills the model's context of 100 tokens"):
        utils.fit_to_context(Model, 100, kwargs)


def poison_after_step(monkeypatch, step: int):
    """From `step` on, the loss (and so every gradient and weight) becomes NaN, as in a diverged run."""
    original = sft.sft_trainer_class

    def patched():
        base = original()

        class Diverging(base):
            def compute_loss(self, model, inputs, *a, **k):
                loss = super().compute_loss(model, inputs, *a, **k)
                if self.state.global_step >= step:
                    loss = loss * float("nan")
                return loss

        return Diverging

    monkeypatch.setattr(sft, "sft_trainer_class", patched)


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_names_the_last_good_checkpoint(tmp_path, tiny_model, sample_dataset,
                                                                   monkeypatch, capsys):
    poison_after_step(monkeypatch, 5)  # steps are counted from 0 inside the step: step 6 is the first NaN
    out = tmp_path / "run"
    code = train_lora.main(train_argv(tiny_model, sample_dataset, out, "--max-steps", "10", "--save-steps", "4"))
    line = one_error_line(capsys)
    assert code == 2
    assert line.startswith("error: training loss became nan at step 6; the last good checkpoint is "
                           f"{out / 'checkpoint-4'}"), line
    assert "lower --learning-rate" in line and "no final_model was written" in line
    assert not (out / "final_model").exists() and not (out / "checkpoint-8").exists()
    assert not (out / utils.RunLock.NAME).exists()
    logged = [json.loads(l) for l in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    # the NaN is in the log, not hidden by the running mean: strict JSON's null, named as non-finite
    assert logged[-1]["loss"] is None and "loss" in logged[-1]["non_finite"]


def test_a_checkpoint_of_nan_weights_is_not_resumed(tmp_path, checkpointed_run):
    import torch
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)
    weights = run / "checkpoint-8" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    size = weights.stat().st_size
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert weights.stat().st_size == size
    assert "adapter weights hold NaN or inf" in checkpoints.checkpoint_problem(run / "checkpoint-8")


# ---------------------------------------------------------------------------------------------
# 3. Late failures that lose work
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["trainer_state.json", checkpoints.CHECKPOINT_MARKER])
def test_garbage_checkpoint_metadata(tmp_path, checkpointed_run, name, caplog):
    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)
    (run / "checkpoint-8" / name).write_text("{{{ not json")
    assert checkpoints.resolve_resume("latest", run, run_uri=None) == str(run / "checkpoint-4")
    assert f"skipping {run / 'checkpoint-8'}" in caplog.text and "is not valid JSON" in caplog.text
    with pytest.raises(utils.UserError, match=r"cannot resume from .*checkpoint-8: .* is not valid JSON"):
        checkpoints.resolve_resume(str(run / "checkpoint-8"), run, run_uri=None)


# ---------------------------------------------------------------------------------------------
# 4. Resuming a run that already reached its end; Ctrl-C
# ---------------------------------------------------------------------------------------------


def adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
def test_resuming_a_finished_run_trains_no_step_past_its_end(tmp_path, checkpointed_run, tiny_model, sample_dataset,
                                                                capsys):
    """The Trainer checks --max-steps only after a step: resumed from its last checkpoint (preempted
    while writing final_model, say) a run trained step 9 of 8. Now it trains none and finishes from
    the checkpoint as a full run would."""
    import torch

    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)
    before = json.loads((run / "training_metrics.json").read_text())
    shutil.rmtree(run / "final_model")  # as if the kill came while it was written
    argv = train_argv(tiny_model, sample_dataset, run, "--max-steps", "8", "--save-steps", "4", "--eval-steps", "4",
                      "--num-epochs", "1", "--resume-from-checkpoint", "latest")
    assert train_lora.main(argv) == 0
    err = capsys.readouterr().err
    assert "checkpoint-8 is at step 8, and this run plans 8" in err and "no step is trained" in err
    after = json.loads((run / "training_metrics.json").read_text())
    assert after["global_step"] == 8 and not (run / "checkpoint-9").exists()
    assert [h["loss"] for h in after["history"] if "loss" in h] == [h["loss"] for h in before["history"] if "loss" in h]
    # The mean over the whole run, not the Trainer's (nothing since the resume, divided by 8 steps: 0).
    assert after["train_loss_mean"] == pytest.approx(before["train_loss_mean"], rel=1e-9)
    assert after["train_loss_mean"] > 1
    best = run / Path(before["best_checkpoint"]).name
    final, kept = adapter_tensors(run / "final_model"), adapter_tensors(best)
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)
    # A lower --max-steps than the checkpoint's step trains nothing either (the Trainer alone would train step 9 of 4).
    assert train_lora.main([*argv[:-2], "--max-steps", "4", "--resume-from-checkpoint", "latest"]) == 0
    assert json.loads((run / "training_metrics.json").read_text())["global_step"] == 8
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]


@pytest.mark.slow
def test_ctrl_c_names_the_checkpoint_and_the_resume_command(tmp_path, tiny_model, sample_dataset, capsys, monkeypatch):
    from reasonforge.callbacks import StepLogger

    step_end = StepLogger.on_step_end

    def interrupt_at_6(self, args, state, control, **kw):
        if state.global_step == 6:
            raise KeyboardInterrupt
        return step_end(self, args, state, control, **kw)

    monkeypatch.setattr(StepLogger, "on_step_end", interrupt_at_6)
    out = tmp_path / "run"
    assert train_lora.main(train_argv(tiny_model, sample_dataset, out, "--max-steps", "8", "--save-steps", "4",
                                      "--eval-steps", "4")) == 130
    captured = capsys.readouterr()
    assert f"interrupted; the newest complete checkpoint is {out / 'checkpoint-4'}\nresume with:" in captured.err
    assert captured.err.rstrip().endswith("--resume-from-checkpoint latest")
    assert not (out / "final_model").exists() and not (out / utils.RunLock.NAME).exists()
    # On the CPU the Trainer does not checkpoint under auto, and the banner and config say so.
    assert "Checkpointing: off (--gradient-checkpointing auto); every layer keeps its activations" in captured.out
    kept = json.loads((out / "training_config.json").read_text())["kept_layers"]
    assert kept["kept"] == kept["layers"] == 2
