"""Fault drills, load and secrets: what a preempted instance, a flaky S3 or a careless log would break."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import data_preparation as dp
import evaluate_model as ev
import reasonforge.s3
import test_model as tm
import train_lora
from reasonforge import checkpoints
import reasonforge.generation
import utils
from conftest import S3Server, S3_KEY_ID, S3_SECRET

ROOT = Path(__file__).resolve().parents[1]


def script(name, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, str(ROOT / name), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def train_args(model, data, out):
    return ["--model-name", model, "--dataset-path", data, "--output-dir", out, "--max-steps", "12", "--save-steps", "4",
            "--batch-size", "4", "--gradient-accumulation-steps", "1", "--learning-rate", "5e-3", "--seed", "5"]


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_matches(tmp_path, tiny_model, sample_dataset):
    full = tmp_path / "full"
    proc = script("train_lora.py", *train_args(tiny_model, sample_dataset, full))
    assert proc.wait(timeout=600) == 0, proc.stdout.read()[-2000:]

    killed = tmp_path / "killed"
    proc = script("train_lora.py", *train_args(tiny_model, sample_dataset, killed))
    marker = killed / "checkpoint-4" / checkpoints.CHECKPOINT_MARKER
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run never completed checkpoint-4"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final_model").exists()

    proc = script("train_lora.py", *train_args(tiny_model, sample_dataset, killed), "--resume-from-checkpoint", "latest")
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-2000:]
    assert "resuming from" in out
    a = json.loads((full / "training_metrics.json").read_text())
    b = json.loads((killed / "training_metrics.json").read_text())
    assert a["global_step"] == b["global_step"] == 12
    # Tolerance: 1e-4 relative. Same data order, optimizer, scheduler and RNG on CPU make it exact in practice.
    assert b["train_loss_last"] == pytest.approx(a["train_loss_last"], rel=1e-4)
    assert b["best_validation_loss"] == pytest.approx(a["best_validation_loss"], rel=1e-4)


@pytest.mark.slow
def test_interrupted_adapter_save_leaves_no_final_model(tmp_path, tiny_model, sample_dataset, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", boom)
    out = tmp_path / "run"
    code = train_lora.main(train_args(str(tiny_model), str(sample_dataset), str(out))[:-6] + ["--max-steps", "2"])
    assert code == 130
    assert not (out / "final_model").exists()
    assert not list(out.glob(".final_model.partial-*"))


@pytest.fixture
def own_s3(tmp_path, monkeypatch):
    server = S3Server(tmp_path / "weed")
    server.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("RF_S3_MAX_ATTEMPTS", "2")
    utils.s3_client().create_bucket(Bucket="outage")
    yield server
    server.stop()


def test_s3_outage_during_upload_then_retry_completes(tmp_path, own_s3, monkeypatch, capsys):
    real_client = utils.s3_client
    uploads = []

    class StopAfterFirstFile:
        def __init__(self):
            self.inner = real_client()

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def upload_file(self, *a, **k):
            self.inner.upload_file(*a, **k)
            uploads.append(a[2])
            if len(uploads) == 1:
                own_s3.stop()  # the server goes away in the middle of the upload

    monkeypatch.setattr(reasonforge.s3, "s3_client", StopAfterFirstFile)  # where upload_directory finds it
    out = tmp_path / "prepared"
    argv = ["--dataset", "sample", "--max-samples", "200", "--output-dir", str(out), "--s3-bucket", "outage",
            "--s3-prefix", "datasets/outage"]
    assert dp.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot reach the S3 endpoint for s3://outage")
    assert len(uploads) == 1

    own_s3.start()
    monkeypatch.setattr(reasonforge.s3, "s3_client", real_client)
    assert dp.main(argv) == 0
    remote = utils.list_s3_objects(utils.s3_client(), utils.S3Uri("outage", "datasets/outage"))
    local = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()}
    assert set(remote) == set(local)
    for rel, path in local.items():
        assert remote[rel]["etag"] == utils.s3_etag_of_file(path, path.stat().st_size), rel


@pytest.mark.slow
def test_no_secret_reaches_any_output(tmp_path, tiny_model, s3_env, monkeypatch, capsys):
    hf_token = "hf_TESTSECRETtoken0123456789"
    monkeypatch.setenv("HF_TOKEN", hf_token)
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-value-42")
    monkeypatch.chdir(tmp_path)
    data, run = tmp_path / "data", tmp_path / "run"
    assert dp.main(["--dataset", "sample", "--max-samples", "60", "--output-dir", str(data), "--s3-bucket", s3_env]) == 0
    assert train_lora.main(["--model-name", str(tiny_model), "--dataset-path", str(data), "--output-dir", str(run),
                            "--max-steps", "2", "--save-steps", "2", "--s3-bucket", s3_env]) == 0
    assert ev.main(["--model-path", str(run / "final_model"), "--dataset-path", str(data), "--max-eval-samples", "2",
                    "--max-new-tokens", "2", "--output-file", str(tmp_path / "eval.json")]) == 0
    instr = tmp_path / "i.json"
    instr.write_text('["hello"]')
    assert tm.main(["--model-path", str(run / "final_model"), "--batch", "--instructions-file", str(instr),
                    "--max-new-tokens", "2", "--output-file", str(tmp_path / "chat.json")]) == 0
    console = capsys.readouterr()
    secrets = [hf_token, S3_SECRET, "wandb-secret-value-42"]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 20
    for path in files:
        blob = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in blob, f"{secret} found in {path}"
    for secret in secrets:
        assert secret not in console.out and secret not in console.err
    # And on S3: every object the pipeline uploaded.
    client = utils.s3_client()
    for key in utils.list_s3_objects(client, utils.S3Uri(s3_env, "")):
        body = client.get_object(Bucket=s3_env, Key=key)["Body"].read()
        assert not any(s.encode() in body for s in secrets), key


def test_trust_remote_code_off_by_default(tiny_model, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = []
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: seen.append(k) or real_model(*a, **k))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: seen.append(k) or real_tok(*a, **k))
    utils.load_model(str(tiny_model), backend="hf")
    assert seen and all(k.get("trust_remote_code") is False for k in seen)
    args = train_lora.build_parser().parse_args([])
    assert args.trust_remote_code is False


def test_pickle_adapter_is_refused(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x"}))
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not-a-safetensors")
    with pytest.raises(utils.UserError, match="only safetensors adapters are loaded"):
        utils.resolve_model_for_inference(str(folder), True, None)


# The child writes its own VmHWM at exit: ru_maxrss of a spawned child also counts the parent's
# pages from before exec, so after a test that loaded a model it reports the pytest process's peak.
PEAK_RSS_RUNNER = """
import atexit, runpy, sys
report, path = sys.argv[1], sys.argv[2]
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(report, "w").write(line.split()[1])
atexit.register(_peak)
sys.argv = sys.argv[2:]
runpy.run_path(path, run_name="__main__")
"""


@pytest.mark.slow
def test_data_preparation_of_200k_rows_under_2_gib(tmp_path):
    peak_file = tmp_path / "peak_kib"
    proc = subprocess.Popen([sys.executable, "-c", PEAK_RSS_RUNNER, str(peak_file), str(ROOT / "data_preparation.py"),
                             "--dataset", "sample", "--max-samples", "200000", "--skip-upload",
                             "--output-dir", str(tmp_path / "big")],
                            env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-2000:]
    peak_kib = int(peak_file.read_text())
    assert peak_kib > 50 * 1024  # a Python process with datasets loaded; less means the reading is wrong
    assert peak_kib < 2 * 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
    assert "formatting" in out and "Rows: 200000 read" in out  # progress bar and summary
    manifest = json.loads((tmp_path / "big" / "manifest.json").read_text())
    assert manifest["counts"]["input_rows"] == 200000


@pytest.mark.slow
def test_batch_of_1000_instructions_streams_and_keeps_memory_flat(tmp_path, tiny_model, monkeypatch):
    import psutil

    instr = tmp_path / "i.json"
    instr.write_text(json.dumps([f"Instruction number {i}: say something." for i in range(1000)]))
    out = tmp_path / "inf.json"
    partial = tmp_path / "inf.json.partial.jsonl"
    rss, lines = [], []
    original = utils.generate_batch

    def watch(*a, **k):
        result = original(*a, **k)
        rss.append(psutil.Process().memory_info().rss)
        lines.append(len(partial.read_text().splitlines()) if partial.exists() else 0)
        return result

    monkeypatch.setattr(reasonforge.generation, "generate_batch", watch)
    assert tm.main(["--model-path", str(tiny_model), "--batch", "--instructions-file", str(instr), "--batch-size", "50",
                    "--max-new-tokens", "2", "--temperature", "0", "--output-file", str(out)]) == 0
    assert len(rss) == 20
    # each chunk is on disk before the next is generated (after the line naming the run)
    assert lines == [1 + 50 * i for i in range(20)]
    growth_mib = (rss[-1] - rss[2]) / 2**20
    assert growth_mib < 64, f"RSS grew {growth_mib:.1f} MiB over the batch"
    r = json.loads(out.read_text())
    assert r["count"] == 1000 and r["results"][999]["instruction"].startswith("Instruction number 999")
