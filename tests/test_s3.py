"""S3 sync against a real SeaweedFS server on loopback (credentials enforced)."""

import os

import pytest

import data_preparation as dp
import reasonforge.s3
import utils

pytestmark = pytest.mark.s3


def make_tree(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    return root


def test_parse_s3_uri():
    assert utils.parse_s3_uri("s3://my-bucket/a/b/") == utils.S3Uri("my-bucket", "a/b")
    assert str(utils.parse_s3_uri("s3://my-bucket")) == "s3://my-bucket"
    for bad, msg in [("my-bucket/x", "not an S3 URI"), ("s3://UPPER/x", "invalid S3 bucket"), ("s3://ok-bucket/../x", "'..'")]:
        with pytest.raises(utils.UserError, match=msg):
            utils.parse_s3_uri(bad)


def test_upload_download_round_trip_and_skip(s3_env, tmp_path):
    src = make_tree(tmp_path / "src")
    uri = utils.S3Uri(s3_env, "runs/x")
    first = utils.upload_directory(src, uri, progress=False)
    assert first["uploaded"] == 2 and first["skipped"] == 0
    again = utils.upload_directory(src, uri, progress=False)
    assert again == {"uploaded": 0, "skipped": 2, "bytes": 0}
    (src / "a.txt").write_text("alpha-changed")
    third = utils.upload_directory(src, uri, progress=False)
    assert third["uploaded"] == 1 and third["skipped"] == 1
    dst = tmp_path / "dst"
    got = utils.download_prefix(uri, dst, progress=False)
    assert got["downloaded"] == 2
    for rel in ("a.txt", "sub/b.bin"):
        assert (dst / rel).read_bytes() == (src / rel).read_bytes()
    assert utils.download_prefix(uri, dst, progress=False) == {"downloaded": 0, "skipped": 2}


def test_multipart_upload_etag_matches(s3_env, tmp_path, monkeypatch):
    monkeypatch.setattr(reasonforge.s3, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(reasonforge.s3, "MULTIPART_CHUNKSIZE", 5 * 1024 * 1024)
    src = tmp_path / "big"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(12 * 1024 * 1024))
    uri = utils.S3Uri(s3_env, "big")
    assert utils.upload_directory(src, uri, progress=False)["uploaded"] == 1
    remote = utils.list_s3_objects(utils.s3_client(), uri)
    assert remote["weights.bin"]["etag"].endswith("-3")
    assert utils.upload_directory(src, uri, progress=False)["skipped"] == 1


def test_wrong_secret_is_refused_clearly(s3_env, tmp_path, monkeypatch):
    src = make_tree(tmp_path / "src")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong")
    with pytest.raises(utils.UserError) as err:
        utils.upload_directory(src, utils.S3Uri(s3_env, "p"), progress=False)
    assert "rejected the credentials" in str(err.value) and s3_env in str(err.value)
    assert "definitely-wrong" not in str(err.value)


def test_missing_credentials_and_unknown_bucket(s3_env, tmp_path, monkeypatch):
    src = make_tree(tmp_path / "src")
    with pytest.raises(utils.UserError, match="does not exist"):
        utils.upload_directory(src, utils.S3Uri("rf-no-such-bucket", "p"), progress=False)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(utils.UserError, match="no AWS credentials for s3://"):
        utils.upload_directory(src, utils.S3Uri(s3_env, "p"), progress=False)


def test_download_refuses_keys_escaping_target(tmp_path):
    for key in ("../evil", "/abs", "a/../../b", "a//b"):
        with pytest.raises(utils.UserError, match="outside"):
            utils.safe_local_path(tmp_path, key)
    assert utils.safe_local_path(tmp_path, "a/b.txt") == (tmp_path / "a" / "b.txt").resolve()


def test_prepare_upload_download_equals_local(s3_env, tmp_path, capsys):
    out = tmp_path / "prepared"
    code = dp.main(["--dataset", "sample", "--max-samples", "80", "--output-dir", str(out), "--s3-bucket", s3_env,
                    "--s3-prefix", "datasets/test_run"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"S3 URI: s3://{s3_env}/datasets/test_run" in printed
    local = utils.fetch_if_s3(f"s3://{s3_env}/datasets/test_run", cache_root=tmp_path / "cache")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    for rel in files:
        assert (local / rel).read_bytes() == (out / rel).read_bytes()


def test_default_prefix_is_timestamped(s3_env, tmp_path, capsys):
    code = dp.main(["--dataset", "sample", "--max-samples", "40", "--output-dir", str(tmp_path / "o"), "--s3-bucket", s3_env])
    assert code == 0
    uri = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("S3 URI: ")).split(": ", 1)[1]
    import re

    assert re.fullmatch(rf"s3://{s3_env}/datasets/processed_reasoning_\d{{8}}_\d{{6}}", uri)
    manifest = utils.s3_get_json(utils.parse_s3_uri(uri).join("manifest.json"))
    assert manifest["counts"]["input_rows"] == 40


def test_data_prep_s3_failure_is_one_line(s3_env, tmp_path, capsys):
    code = dp.main(["--dataset", "sample", "--max-samples", "40", "--output-dir", str(tmp_path / "o"),
                    "--s3-bucket", "rf-absent-bucket"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: bucket 'rf-absent-bucket' does not exist")
