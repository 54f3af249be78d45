"""What a run pays before its first step: the tokenising map and the compile-cache folder."""

from __future__ import annotations

import os
import stat

import pytest

import train_lora
from reasonforge import compile_cache, grpo, sft, training
from reasonforge.process_state import ProcessChanges
from utils import S3Uri, UserError


def config(*argv) -> training.TrainConfig:
    return training.TrainConfig.from_args(train_lora.build_parser().parse_args(list(argv)))


@pytest.mark.parametrize("method", [sft, grpo])
def test_tokenising_does_not_hash_the_tokenizer(monkeypatch, tmp_path, tiny_model, sample_dataset, method):
    """datasets hashes a map's function to name its result unless told the name; that pickles the
    captured tokenizer's whole vocabulary (seconds per split for Qwen's) on every run."""
    import datasets.arrow_dataset
    import datasets.fingerprint
    from transformers import AutoTokenizer

    hashed = []
    real = datasets.fingerprint.update_fingerprint

    def spy(fp, transform, args):
        hashed.append(args.get("function"))
        return real(fp, transform, args)

    for module in (datasets.fingerprint, datasets.arrow_dataset):  # map() calls it by the name it imported
        monkeypatch.setattr(module, "update_fingerprint", spy)
    cfg = config("--model-name", str(tiny_model), "--dataset-path", str(sample_dataset),
                 "--output-dir", str(tmp_path / "out"), "--method", method.__name__.rsplit(".", 1)[-1],
                 "--max-completion-length", "64")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    data = method.prepare_data(cfg, sft.load_dataset(cfg), tok)
    assert len(data.train) > 0 and len(data.validation) > 0
    assert hashed, "the spy saw no map at all: datasets calls update_fingerprint from elsewhere now"
    assert not [f for f in hashed if getattr(f, "__name__", "") in ("encode", "convert")], hashed


def test_map_fingerprint_follows_the_settings(tiny_model, sample_dataset):
    from transformers import AutoTokenizer

    import utils

    tok = AutoTokenizer.from_pretrained(tiny_model)
    dd, _ = utils.load_prepared_dataset(sample_dataset)
    a = utils.map_fingerprint(dd["train"], tok, "sft", "template", 2048, True)
    assert a == utils.map_fingerprint(dd["train"], tok, "sft", "template", 2048, True)
    assert a != utils.map_fingerprint(dd["train"], tok, "sft", "template", 1024, True)
    assert a != utils.map_fingerprint(dd["validation"], tok, "sft", "template", 2048, True)


def test_map_fingerprint_follows_the_code(tiny_model, sample_dataset, monkeypatch):
    """A rerun after a fix to the row conversion must not be served the old rows from the cache."""
    from reasonforge import chat_format

    import utils

    dd, _ = utils.load_prepared_dataset(sample_dataset)
    a = utils.map_fingerprint(dd["train"], None, "prepare")
    monkeypatch.setattr(chat_format, "_code_digest", lambda: "edited")
    assert a != utils.map_fingerprint(dd["train"], None, "prepare")
    monkeypatch.undo()
    assert a == utils.map_fingerprint(dd["train"], None, "prepare")
    # the digest reads the conversion's source: an edit to conversations.py changes it
    from pathlib import Path

    real = Path.read_bytes
    before = chat_format._code_digest()
    chat_format._code_digest.cache_clear()
    monkeypatch.setattr(Path, "read_bytes", lambda self: real(self) + (b"#" if self.name == "conversations.py" else b""))
    try:
        assert chat_format._code_digest() != before
    finally:
        monkeypatch.undo()
        chat_format._code_digest.cache_clear()


@pytest.fixture
def clean_cache_env():
    """No cache variable set; afterwards, what was there before (use() writes os.environ itself)."""
    saved = {var: os.environ.pop(var, None) for var in compile_cache.FOLDERS}
    yield
    for var, value in saved.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


def test_compile_cache_points_every_cache_into_the_folder(tmp_path, clean_cache_env):
    root = tmp_path / "cc"
    said = compile_cache.use(str(root), "unsloth", ProcessChanges())
    assert said.startswith(str(root.resolve())) and "empty" in said
    for var, sub in compile_cache.FOLDERS.items():
        assert os.environ[var] == str(root.resolve() / sub)
        mode = stat.S_IMODE((root / sub).stat().st_mode)
        assert mode & 0o077 == 0, oct(mode)  # Unsloth loads its bundle only from an owner-only folder
    (root / "inductor" / "graph.bin").write_bytes(b"x" * 2048)
    assert "1 files" in compile_cache.use(str(root), "unsloth", ProcessChanges())


def test_compile_cache_keeps_what_the_user_set(tmp_path, clean_cache_env, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    said = compile_cache.use(str(tmp_path / "cc"), "unsloth", ProcessChanges())
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine") and "TRITON_CACHE_DIR kept as set" in said
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "cc" / "inductor").resolve())


def test_compile_cache_off_and_other_backends_change_nothing(tmp_path, clean_cache_env):
    assert "defaults" in compile_cache.use("none", "unsloth", ProcessChanges())
    assert "nothing is compiled" in compile_cache.use(str(tmp_path / "cc"), "hf", ProcessChanges())
    assert not any(var in os.environ for var in compile_cache.FOLDERS) and not (tmp_path / "cc").exists()


def test_compile_cache_unwritable_folder_is_one_line(tmp_path, clean_cache_env):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="--compile-cache-dir .*cannot make it.*none"):
        compile_cache.use(str(blocker / "cc"), "unsloth", ProcessChanges())


def test_compile_cache_flag_defaults(monkeypatch):
    monkeypatch.delenv("REASONFORGE_COMPILE_CACHE", raising=False)
    assert train_lora.build_parser().parse_args([]).compile_cache_dir == compile_cache.DEFAULT


def test_coldstart_report_lays_phases_side_by_side():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_coldstart.py"
    spec = importlib.util.spec_from_file_location("bench_coldstart", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = {"time_to_first_step_s": 50.0, "wall_to_last_step_s": 80.0, "steady_tokens_per_s": 9000.0, "first_step_s": 6.0}
    runs = {"stock-warm": {**run, "setup_phases_s": {"imports": 30.0, "model load": 5.0, "trainer build": 1.0}},
            "suite-warm": {**run, "time_to_first_step_s": 55.0, "steady_tokens_per_s": 18000.0, "first_step_s": 7.5,
                           "setup_phases_s": {"imports": 31.0, "dataset load": 0.2, "model load": 5.5}}}
    runs["suite-cold"] = {**run, "losses": [2.0, 1.5]}
    runs["suite-warm"]["losses"] = [2.0, 1.503]
    text = bench.markdown({"shape": "s", "steps": 20, "micro": 2, "accum": 4, "cores": "0-3",
                           "runs": {"stock-cold": {**run, "time_to_first_step_s": 90.0}, **runs}})
    assert "Per-step losses, warm caches against cold: largest relative difference 2.0e-03." in text
    assert "| suite-warm | 55.0 s | -35.0 s |" in text and "2.00x" in text
    assert "| part | stock-warm | suite-warm |" in text
    assert "| dataset load | - | 0.2 |" in text and "| trainer build | 1.0 | - |" in text
    assert "| first step | 6.0 | 7.5 |" in text


def fill_cache(root, files):
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_compile_cache_copy_on_s3_warms_a_new_disk(s3_env, tmp_path):
    """A replacement instance (an empty cache folder) gets what the preempted one compiled."""
    import utils

    run_uri = utils.S3Uri(s3_env, "adapters/run-a")
    first = compile_cache.Mirror.for_run(str(tmp_path / "old"), "unsloth", run_uri)
    assert first.restore().startswith("none yet")
    assert first.publish() is None  # nothing compiled yet: nothing to copy
    compiled = {"inductor/fxgraph/ab/graph.py": b"graph" * 100, "triton/K1/kernel.cubin": b"\x00\x01" * 300,
                "unsloth_compiled/UnslothSFTTrainer.py": b"class X: pass\n"}
    fill_cache(tmp_path / "old", {**compiled, "triton/K1/kernel.lock": b"", "inductor/locks/a.lock": b""})
    assert "copied to" in first.publish()
    assert first.publish() is None  # once per run

    fresh = compile_cache.Mirror.for_run(str(tmp_path / "new"), "unsloth", run_uri)
    said = fresh.restore()
    assert said.startswith("restored 3 files"), said
    for rel, data in compiled.items():
        assert (tmp_path / "new" / rel).read_bytes() == data
    assert not list((tmp_path / "new").rglob("*.lock"))  # lock files of a running compile are not copied
    assert fresh.publish() is None  # it found everything it has; nothing new to copy back
    assert not list(tmp_path.glob(".compile-cache-*"))  # temporary tar folders are gone


def test_compile_cache_copy_from_another_environment_is_not_used(s3_env, tmp_path, monkeypatch):
    import utils

    run_uri = utils.S3Uri(s3_env, "adapters/run-b")
    old = compile_cache.Mirror.for_run(str(tmp_path / "old"), "unsloth", run_uri)
    fill_cache(tmp_path / "old", {"inductor/g.py": b"x"})
    old.publish()
    monkeypatch.setattr(compile_cache, "environment", lambda: {**old.env, "torch": "9.9.9"})
    fresh = compile_cache.Mirror.for_run(str(tmp_path / "new"), "unsloth", run_uri)
    said = fresh.restore()
    assert "another environment" in said and "torch" in said and "9.9.9 here" in said
    assert not any(p.is_file() for p in (tmp_path / "new").rglob("*"))


def test_compile_cache_copy_failure_is_a_warning_not_a_stop(s3_env, tmp_path, monkeypatch, caplog):
    import utils

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    mirror = compile_cache.Mirror.for_run(str(tmp_path / "cc"), "unsloth", utils.S3Uri(s3_env, "adapters/r"))
    assert "failed; compiling afresh" in mirror.restore()
    fill_cache(tmp_path / "cc", {"inductor/g.py": b"x"})
    assert mirror.publish() is None
    assert "could not copy" in caplog.text and "not-the-secret" not in caplog.text


def test_compile_cache_copy_only_where_it_applies(tmp_path, monkeypatch):
    import utils

    uri = utils.S3Uri("bucket", "adapters/r")
    assert compile_cache.Mirror.for_run(str(tmp_path), "unsloth", None) is None  # nothing uploaded
    assert compile_cache.Mirror.for_run(str(tmp_path), "hf", uri) is None
    assert compile_cache.Mirror.for_run("none", "unsloth", uri) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert compile_cache.Mirror.for_run(str(tmp_path), "unsloth", uri) is None


def test_compile_cache_sync_copies_once_and_never_during_a_stop():
    from types import SimpleNamespace

    from reasonforge.callbacks import CompileCacheSync

    calls = []
    mirror = SimpleNamespace(publish=lambda: calls.append("publish"))
    stopping = {"now": True}
    guard = SimpleNamespace(stop_requested=lambda: stopping["now"])
    sync = CompileCacheSync(mirror, guard)
    state = SimpleNamespace(is_world_process_zero=True)
    sync.on_save(None, state, None)
    assert calls == []  # a SIGTERM is pending: the checkpoint has the time, not the cache
    stopping["now"] = False
    sync.on_save(None, state, None)
    sync.on_train_end(None, state, None)
    assert calls == ["publish", "publish"]  # Mirror.publish itself copies only the first time
    sync.on_save(None, SimpleNamespace(is_world_process_zero=False), None)
    assert len(calls) == 2


def test_compile_cache_set_wholly_by_the_environment_is_left_alone(tmp_path, clean_cache_env, monkeypatch):
    for var in compile_cache.FOLDERS:
        monkeypatch.setenv(var, str(tmp_path / var))
    said = compile_cache.use(str(tmp_path / "cc"), "unsloth", ProcessChanges())
    assert "--compile-cache-dir not used" in said and not (tmp_path / "cc").exists()
    # nor is the S3 copy: the folder would hold nothing of the run
    assert compile_cache.Mirror.for_run(str(tmp_path / "cc"), "unsloth", S3Uri("bucket", "adapters/r")) is None


def test_compile_cache_default_that_cannot_be_made_is_a_warning(tmp_path, clean_cache_env, monkeypatch, caplog):
    blocker = tmp_path / "home"
    blocker.write_text("")  # a file where the home folder should be
    monkeypatch.setenv("HOME", str(blocker))
    said = compile_cache.use(compile_cache.DEFAULT, "unsloth", ProcessChanges())
    assert "could not be made" in said and "cannot make" in caplog.text
    assert not any(var in os.environ for var in compile_cache.FOLDERS)
