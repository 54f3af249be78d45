"""Training checkpoints: completeness marker, local and S3 listing, upload and download, resume choice and resume-settings checks."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from reasonforge import core, rundirs, s3, train_config
from reasonforge.core import UserError

log = logging.getLogger("reasonforge.train")

CHECKPOINT_MARKER = "reasonforge_checkpoint.json"  # written last: a checkpoint without it is incomplete


# ---------------------------------------------------------------------------------------------
# Completeness
# ---------------------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def write_checkpoint_marker(ckpt: Path) -> None:
    # A copy of the run's resolved settings travels with the checkpoint, so a resume on a fresh
    # instance (checkpoint fetched from S3, no training_config.json beside it) can still compare.
    config = ckpt.parent / "training_config.json"
    if config.is_file():
        shutil.copyfile(config, ckpt / "training_config.json")
    files = {p.relative_to(ckpt).as_posix(): p.stat().st_size for p in sorted(ckpt.rglob("*"))
             if p.is_file() and p.name != CHECKPOINT_MARKER}
    core.atomic_write_json(ckpt / CHECKPOINT_MARKER, {"step": checkpoint_step(ckpt), "files": files})


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from, or None when it is complete."""
    marker = ckpt / CHECKPOINT_MARKER
    if not marker.is_file():
        return "no completion marker (interrupted while saving)"
    try:
        files = core.read_json(marker, "completion marker").get("files")
        core.read_json(ckpt / "trainer_state.json", "trainer state")
    except core.CorruptFile as exc:
        return str(exc).split(";")[0]
    if not isinstance(files, dict) or not all(isinstance(s, int) for s in files.values()):
        return f"{CHECKPOINT_MARKER} has no valid file list (damaged)"
    for rel, size in files.items():
        f = ckpt / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} is {f.stat().st_size} bytes, expected {size} (truncated)"
    weights = ckpt / "adapter_model.safetensors"
    if not weights.is_file():
        return "adapter_model.safetensors is missing"
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            # A run that diverged saves NaN weights as readily as good ones; resuming them goes nowhere.
            diverged = [k for k in fh.keys() if not fh.get_tensor(k).isfinite().all()]
    except Exception as exc:
        return f"adapter_model.safetensors is unreadable ({core.first_line(exc, 120)})"
    if diverged:
        return f"adapter weights hold NaN or inf ({len(diverged)} tensors, e.g. {diverged[0]}): the run had diverged"
    return None


def is_checkpoint(folder: Path) -> bool:
    return any((folder / name).is_file() for name in (CHECKPOINT_MARKER, "trainer_state.json", "adapter_config.json"))


def local_checkpoints(output_dir: Path) -> list[Path]:
    return sorted((p for p in output_dir.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) >= 0), key=checkpoint_step)


def last_good_checkpoint(output_dir: Path) -> Path | None:
    good = [p for p in local_checkpoints(output_dir) if checkpoint_problem(p) is None]
    return good[-1] if good else None


def previous_run_problem(output_dir: Path, run_uri: s3.S3Uri | None, resume: str | None) -> str | None:
    """Why a new run may not start here, or None: --output-dir (or the --run-name prefix on S3)
    holds the checkpoints or final model of a run that this one does not resume. Started there,
    the new run's checkpoints would sit beside the old run's, `latest` would pick the old run's
    newest, and its final model and metrics would replace the new run's.

    A resume (`resume` set) continues the run the folder holds; whether its settings may do so is
    check_resume_settings' question."""
    if resume is not None:
        return None
    found = [p.name for p in local_checkpoints(output_dir)]
    found += [n for n in ("final_model", "training_metrics.json") if (output_dir / n).exists()]
    if found:
        return (f"--output-dir {output_dir} holds another run's {_names(found)}: to continue that run pass "
                "--resume-from-checkpoint latest; to start a new one choose a fresh --output-dir (or remove the old run)")
    if run_uri is None:
        return None
    remote = [n for n in s3.list_s3_subfolders(run_uri) if n in ("checkpoints", "final_model")]
    if "checkpoints" in remote:
        remote = s3.list_s3_subfolders(run_uri.join("checkpoints")) + [n for n in remote if n != "checkpoints"]
    if remote:
        return (f"--run-name {run_uri.prefix.rsplit('/', 1)[-1]}: {run_uri} holds another run's {_names(remote)}: to "
                "continue that run pass --resume-from-checkpoint latest; to start a new one choose another --run-name")
    return None


def _names(found: list[str], limit: int = 3) -> str:
    return ", ".join(found[:limit]) + (f" and {len(found) - limit} more" if len(found) > limit else "")


# ---------------------------------------------------------------------------------------------
# The S3 mirror: s3://BUCKET/adapters/RUN/checkpoints/checkpoint-N/
# ---------------------------------------------------------------------------------------------


def upload_checkpoint(ckpt: Path, run_uri: s3.S3Uri) -> None:
    """Upload a checkpoint with its marker last, so a listing never shows a half-uploaded one as complete."""
    dest = run_uri.join("checkpoints", ckpt.name)
    marker = core.read_json(ckpt / CHECKPOINT_MARKER, "completion marker")
    s3.upload_directory(ckpt, dest, desc=f"s3 {ckpt.name}", progress=False, exclude={CHECKPOINT_MARKER})
    s3.s3_put_json(dest.join(CHECKPOINT_MARKER), marker)


def s3_complete_checkpoints(run_uri: s3.S3Uri) -> list[int]:
    steps = []
    for name in s3.list_s3_subfolders(run_uri.join("checkpoints")):
        step = checkpoint_step(Path(name))
        if step < 0:
            continue
        try:
            marker = s3.s3_get_json(run_uri.join("checkpoints", name, CHECKPOINT_MARKER))
        except core.CorruptFile as exc:
            log.warning("skipping %s on S3: %s", name, exc)
            continue
        if marker is not None:
            steps.append(step)
    return sorted(steps)


def download_checkpoint(run_uri: s3.S3Uri, step: int, output_dir: Path) -> Path:
    final = output_dir / f"checkpoint-{step}"
    with rundirs.atomic_directory(final, is_checkpoint, "a checkpoint folder") as tmp:
        s3.download_prefix(run_uri.join("checkpoints", final.name), tmp, desc=f"fetch {final.name}")
    return final


# ---------------------------------------------------------------------------------------------
# Which checkpoint to resume from
# ---------------------------------------------------------------------------------------------


def resume_flag_problem(spec: str | None) -> str | None:
    """What is wrong with --resume-from-checkpoint `spec` before anything loads (train_lora.py's
    checks), or None."""
    if spec in (None, "latest") or Path(spec).is_dir():
        return None
    return f"--resume-from-checkpoint {spec!r} is not a folder; pass a checkpoint-N folder or 'latest'"


def resolve_resume(spec: str | None, output_dir: Path, run_uri: s3.S3Uri | None) -> str | None:
    """Turn --resume-from-checkpoint `spec` into a complete local checkpoint folder (or None to start
    fresh); 'latest' also looks on S3 under `run_uri` and downloads what it picks from there."""
    if spec is None:
        return None
    if spec != "latest":
        problem = resume_flag_problem(spec)
        if problem:
            raise UserError(problem)
        path = Path(spec)
        problem = checkpoint_problem(path)
        if problem:
            raise UserError(f"cannot resume from {spec}: {problem}; pick an older checkpoint or 'latest'")
        return str(path)
    candidates = {checkpoint_step(p): ("local", p) for p in local_checkpoints(output_dir)}
    if run_uri is not None:
        for step in s3_complete_checkpoints(run_uri):
            candidates.setdefault(step, ("s3", step))
    for step in sorted(candidates, reverse=True):
        where, ref = candidates[step]
        path = ref if where == "local" else download_checkpoint(run_uri, step, output_dir)
        problem = checkpoint_problem(path)
        if problem is None:
            log.info("resuming from %s (%s, step %d)", path, where, step)
            fetch_best_checkpoint(path, run_uri, output_dir)
            return str(path)
        log.warning("skipping %s: %s; trying the previous checkpoint", path, problem)
    log.warning("--resume-from-checkpoint latest: no complete checkpoint in %s%s; starting from scratch",
                output_dir, f" or {run_uri}" if run_uri else "")
    return None


def fetch_best_checkpoint(ckpt: Path, run_uri, output_dir: Path) -> None:
    """The Trainer reloads the best checkpoint at the end; on a fresh instance it must be fetched too."""
    state = core.read_json(ckpt / "trainer_state.json", "trainer state")
    best = state.get("best_model_checkpoint")
    if not best:
        return
    local = output_dir / Path(best).name
    if not local.is_dir() and run_uri is not None:
        download_checkpoint(run_uri, checkpoint_step(local), output_dir)
    state["best_model_checkpoint"] = str(local)
    core.atomic_write_json(ckpt / "trainer_state.json", state)
    marker = core.read_json(ckpt / CHECKPOINT_MARKER, "completion marker")
    marker["files"]["trainer_state.json"] = (ckpt / "trainer_state.json").stat().st_size
    core.atomic_write_json(ckpt / CHECKPOINT_MARKER, marker)


def resume_on_all_ranks(spec: str | None, output_dir: Path, run_uri: s3.S3Uri | None, state) -> str | None:
    """Rank 0 finds (and, from S3, downloads) the checkpoint; the others wait and take the same one."""
    resume = resolve_resume(spec, output_dir, run_uri) if state.is_main_process else None
    state.wait_for_everyone()
    if not state.is_main_process and spec:
        complete = [p for p in local_checkpoints(output_dir) if checkpoint_problem(p) is None]
        resume = str(complete[-1]) if spec == "latest" and complete else (spec if spec != "latest" else None)
    return resume


# ---------------------------------------------------------------------------------------------
# Settings a resume may and may not change
# ---------------------------------------------------------------------------------------------

# What a resume may change and what not is each flag's `resume` rule in train_config.py: "fixed"
# flags fix the adapter's shape, its data or its optimizer state; loading a checkpoint under other
# values crashes (shapes, optimizer state) or quietly trains on other data than the first part of
# the run. In transformers 5.17 the restored optimizer brings back its param groups (learning rate,
# weight decay) and the restored LambdaLR its base learning rates ("kept"), while the schedule's
# shape (warmup, decay, total steps) is rebuilt from this run's arguments; the data position is
# recomputed as global_step % steps-per-epoch.
def fixed_on_resume() -> dict[str, str]:
    """{field: how messages name it} of the flags a resume cannot change."""
    return {name: train_config.shown_name(f) for name, f in train_config.resume_rules("fixed").items()}


def changeable_on_resume() -> dict[str, tuple[str, str, str]]:
    """{field: (name, "kept" | "applied", what the change does)} of the flags a resume may change."""
    out = {}
    for rule in ("kept", "applied"):
        for name, f in train_config.resume_rules(rule).items():
            out[name] = (train_config.shown_name(f), rule, f.metadata.get("effect") or "takes effect")
    return out


def _setting(config: dict, key: str):
    value = config.get("arguments", {}).get(key)
    if key == "target_modules" and isinstance(value, str):
        return sorted(t.strip() for t in value.split(",") if t.strip())
    return value


def _shown(value) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def recorded_config(ckpt: Path, output_dir: Path) -> dict | None:
    """The settings `ckpt` was trained with: its own copy, else (older checkpoints) the run's."""
    for path in (ckpt / "training_config.json", output_dir / "training_config.json"):
        if path.is_file():
            return json.loads(path.read_text())
    return None


def resume_differences(config: dict, recorded: dict) -> tuple[list[str], list[dict]]:
    """(settings that forbid the resume, notes on settings that differ but may), each in words."""
    # a flag newer than the checkpoint's record is not compared: its value then is unknown
    refused = [f"{flag} {_shown(_setting(config, key))} (checkpoint: {_shown(_setting(recorded, key))})"
               for key, flag in fixed_on_resume().items()
               if key in recorded.get("arguments", {}) and _setting(config, key) != _setting(recorded, key)]
    for key, flag in (("optim", "--optim"), ("dataset_manifest_sha256", "dataset content"),
                      ("chat_template_sha256" if "chat_template_sha256" in recorded else "chat_template", "chat template")):
        now, then = config.get(key), recorded.get(key)
        if now is not None and then is not None and now != then:
            shown = (now[:12], then[:12]) if key.endswith("sha256") else (now, then)
            refused.append(f"{flag} {shown[0]} (checkpoint: {shown[1]})")
    notes = []

    def batch(cfg):  # (shown, effective) of micro-batch x accumulation x processes
        micro, accum = _setting(cfg, "batch_size") or 0, _setting(cfg, "gradient_accumulation_steps") or 0
        procs = cfg.get("processes") or 1
        return f"{micro} x {accum}" + (f" x {procs}" if procs > 1 else ""), micro * accum * procs

    (new_shown, new_effective), (old_shown, old_effective) = batch(config), batch(recorded)
    if new_shown != old_shown and old_effective:
        effect = ("takes effect; same effective batch, so the loss curve continues unchanged" if new_effective == old_effective
                  else "takes effect, but the position in the data is recomputed from the step count, so rows of "
                       "the current epoch are repeated or skipped")
        notes.append({"setting": "effective batch", "checkpoint": old_effective, "now": new_effective, "effect": effect,
                      "text": f"batch (--batch-size x --gradient-accumulation-steps x processes) {new_shown} differs "
                              f"from the checkpoint's {old_shown}: {effect}"})
    for key, (flag, kind, effect) in changeable_on_resume().items():
        now, then = _setting(config, key), _setting(recorded, key)
        if key not in recorded.get("arguments", {}) or now == then:
            continue
        effect = effect.format(old=then)
        notes.append({"setting": key, "checkpoint": then, "now": now, "kept": kind == "kept", "effect": effect,
                      "text": f"{flag} {now} differs from the checkpoint's {then}: {effect}"})
    return refused, notes


def refuse(ckpt: Path, refused: list[str]) -> None:
    if refused:
        raise UserError(
            f"cannot resume from {ckpt}: {'; '.join(refused)}. These fix the adapter's shape, its data or its "
            "optimizer state: resume with the checkpoint's values, or start a new run (a new --output-dir "
            "without --resume-from-checkpoint)"
        )


def refuse_resume_early(config: dict, ckpt: Path, output_dir: Path) -> None:
    """check_resume_settings' refusals on what is known before the model loads (the flags, the
    optimizer, the dataset); the notes on changed settings come with the full check."""
    recorded = recorded_config(ckpt, output_dir)
    if recorded is not None:
        refuse(ckpt, resume_differences(config, recorded)[0])


def check_resume_settings(config: dict, ckpt: Path, output_dir: Path, announce: bool = True) -> dict:
    """Refuse a resume whose settings cannot apply to `ckpt`; say what the others do.

    Returns the config to record: values the checkpoint keeps regardless (learning rate, weight
    decay) are recorded as the checkpoint's, so training_config.json says what actually ran.
    """
    recorded = recorded_config(ckpt, output_dir)
    if recorded is None:
        if announce:
            log.warning("%s records no settings (training_config.json): resuming without comparing them", ckpt)
        return config
    refused, notes = resume_differences(config, recorded)
    refuse(ckpt, refused)
    config = json.loads(json.dumps(config, default=str))
    for note in notes:
        if announce:
            log.warning(note.pop("text"))
        else:
            note.pop("text")
        if note.get("kept"):
            config["arguments"][note["setting"]] = note["checkpoint"]
    config["resumed_from"] = {"checkpoint": str(ckpt), "step": checkpoint_step(ckpt), "differences": notes}
    return config
