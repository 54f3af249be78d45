"""The folder where compiled graphs and kernels outlive a run (--compile-cache-dir), so the next run skips the compile."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from reasonforge.core import UserError

log = logging.getLogger("reasonforge.compile_cache")

DEFAULT = "~/.cache/reasonforge/compile"
OFF = ("none", "off")

# Each cache the first step fills, by the variable its owner reads. Left alone, Inductor's and
# Triton's live under /tmp (gone after a reboot, and so after a stop/start of a spot instance) and
# Unsloth writes its generated modules into whatever folder the command was started from, so a
# run started elsewhere regenerates them.
FOLDERS = {
    "TORCHINDUCTOR_CACHE_DIR": "inductor",  # FX-graph and AOTAutograd caches, compiled wrappers
    "TRITON_CACHE_DIR": "triton",  # built kernels and autotuning results
    "UNSLOTH_COMPILE_LOCATION": "unsloth_compiled",  # Unsloth's generated model code
    "UNSLOTH_MEGA_CACHE_DIR": "unsloth_mega",  # Unsloth's bundle of torch.compile artifacts
}


def use(folder: str | None, backend: str, changes) -> str:
    """Point the compile caches at `folder` (made if missing), through `changes` (the run's
    ProcessChanges, which puts the variables back); returns the banner's account of it.

    Must run before Unsloth is imported, which reads its folder once. A variable the user set
    already wins. Folders are made owner-only because Unsloth refuses to load its bundle from a
    folder others can write (the artifacts are executable).
    """
    if backend != "unsloth":
        return "none (nothing is compiled on this backend)"
    if not folder or folder.lower() in OFF:
        return "torch's and Unsloth's own defaults (--compile-cache-dir none)"
    root = Path(folder).expanduser().resolve()
    # a value that is already this folder's was set by an earlier setup in this process, not by the user
    # (a run's ProcessChanges puts the variables back when it ends, but a failed one may not have run)
    kept = [var for var, sub in FOLDERS.items() if os.environ.get(var) and os.environ[var] != str(root / sub)]
    if len(kept) == len(FOLDERS):
        return "where the environment puts each cache (" + ", ".join(kept) + "); --compile-cache-dir not used"
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for var, sub in FOLDERS.items():
            if var not in kept:
                (root / sub).mkdir(exist_ok=True, mode=0o700)
    except OSError as e:
        if folder != DEFAULT:  # asked for by name: say so rather than run without it
            raise UserError(f"--compile-cache-dir {folder}: cannot make it ({e.strerror}); pass a folder you can "
                            "write, or none for torch's own /tmp caches") from e
        # the default only saves time; a machine with no writable home still trains
        log.warning("compile cache: cannot make %s (%s); using the libraries' own folders", root, e.strerror)
        return f"the libraries' own folders ({root} could not be made: {e.strerror})"
    for var, sub in FOLDERS.items():  # only once every folder exists, so a failure changes nothing
        if var not in kept:
            changes.setenv(var, str(root / sub))
    files, size = footprint(root)
    state = f"holds {files} files, {size / 2**20:.0f} MiB" if files else "empty: this run fills it"
    return f"{root} ({state})" + (f"; {', '.join(kept)} kept as set" if kept else "")


def footprint(root: Path) -> tuple[int, int]:
    """(files, bytes) under `root`."""
    files = size = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            try:
                size += os.stat(os.path.join(dirpath, name)).st_size
                files += 1
            except OSError:  # another run may be replacing it
                pass
    return files, size


# ---------------------------------------------------------------------------------------------
# A copy beside the run on S3, so that a replacement instance (a new disk) starts warm too
# ---------------------------------------------------------------------------------------------

TAR, MANIFEST = "cache.tar", "manifest.json"
SKIPPED_NAMES = ("lock", "locks", "tmp")  # lock files and half-written entries of a running compile


def environment() -> dict:
    """What the compiled artifacts depend on: a copy built under anything else is not used."""
    from reasonforge.core import library_versions

    # torch's version carries its CUDA build, e.g. 2.8.0+cu128
    return {**library_versions(("torch", "triton", "transformers", "unsloth", "unsloth_zoo")), "gpu": gpu_names()}


def gpu_names() -> str:
    """The GPUs' model names, read from the driver without starting CUDA in this process: this runs
    before Unsloth is imported, and Unsloth sets allocator options that CUDA reads when it starts."""
    import glob
    import subprocess

    names = []
    for info in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
        with open(info, errors="replace") as fh:
            names += [line.split(":", 1)[1].strip() for line in fh if line.startswith("Model:")]
    if not names:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20)
            names = [n.strip() for n in out.stdout.splitlines() if n.strip()] if out.returncode == 0 else []
        except (OSError, subprocess.SubprocessError):
            pass
    return ", ".join(names) or "unknown"


def _skipped(name: str) -> bool:
    return name in SKIPPED_NAMES or name.endswith((".lock", ".tmp", ".part"))


class Mirror:
    """The compile cache folder and its copy at s3://.../adapters/RUN/compile_cache/.

    Best effort both ways: the cache only saves time, so an S3 failure is one warning line and the
    run goes on compiling locally. Only a single-process run uses it: several ranks sharing one
    folder would read files another rank is still extracting.
    """

    def __init__(self, root: Path, uri, env: dict):
        self.root, self.uri, self.env = root, uri, env
        self.before = footprint(root)
        self.published = False

    @classmethod
    def for_run(cls, folder: str | None, backend: str, run_uri) -> Mirror | None:
        if run_uri is None or backend != "unsloth" or not folder or folder.lower() in OFF:
            return None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return None
        root = Path(folder).expanduser().resolve()
        placed = [os.environ.get(var) for var in FOLDERS]
        if all(placed) and not any(Path(p).resolve().is_relative_to(root) for p in placed):
            return None  # the environment put every cache elsewhere: the folder holds nothing of this run
        return cls(root, run_uri.join("compile_cache"), environment())

    def restore(self) -> str:
        """Fill an empty local folder from the S3 copy built under the same versions and GPU."""
        from reasonforge import core, s3

        if self.before[0]:
            return "kept locally; S3 copy not needed"
        try:
            manifest = s3.s3_get_json(self.uri.join(MANIFEST))
            if manifest is None:
                return f"none yet at {self.uri}"
            if manifest.get("environment") != self.env:
                theirs = manifest.get("environment") or {}
                differ = ", ".join(f"{k} {theirs.get(k)} there, {v} here" for k, v in self.env.items() if theirs.get(k) != v)
                return f"the copy at {self.uri} was built for another environment ({differ}); compiling afresh"
            self._download()
        except Exception as e:  # noqa: BLE001 - a cache must never stop the run
            log.warning("compile cache: could not restore from %s (%s); compiling afresh", self.uri, core.first_line(str(e)))
            return f"restore from {self.uri} failed; compiling afresh"
        self.before = footprint(self.root)
        return f"restored {self.before[0]} files, {self.before[1] / 2**20:.0f} MiB, from {self.uri}"

    def _download(self) -> None:
        import tarfile
        import tempfile

        from reasonforge import s3

        with tempfile.TemporaryDirectory(dir=self.root.parent, prefix=".compile-cache-") as tmp:
            tar = Path(tmp) / TAR
            s3.download_file(self.uri.join(TAR), tar)
            staging = Path(tmp) / "files"
            with tarfile.open(tar) as fh:
                # "data" refuses absolute paths, links out of the folder and device files
                fh.extractall(staging, filter="data")
            # moved in file by file, each whole: a failed download leaves no half-written entry to load
            for path in sorted(p for p in staging.rglob("*") if p.is_file()):
                target = self.root / path.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.replace(path, target)

    def publish(self) -> str | None:
        """Upload the folder once, if this run compiled anything it did not find there."""
        import tarfile
        import tempfile

        from reasonforge import core, s3

        if self.published or footprint(self.root) == self.before:
            return None
        self.published = True
        try:
            with tempfile.TemporaryDirectory(dir=self.root.parent, prefix=".compile-cache-") as tmp:
                tar = Path(tmp) / TAR
                with tarfile.open(tar, "w") as fh:
                    fh.add(self.root, arcname=".", filter=lambda info: None if _skipped(Path(info.name).name) else info)
                size = tar.stat().st_size
                s3.upload_file(tar, self.uri.join(TAR))
            # the manifest last: a reader that finds it finds the tar it describes
            s3.s3_put_json(self.uri.join(MANIFEST), {"environment": self.env, "bytes": size})
        except Exception as e:  # noqa: BLE001
            log.warning("compile cache: could not copy to %s (%s)", self.uri, core.first_line(str(e)))
            return None
        log.info("compile cache: %.0f MiB copied to %s", size / 2**20, self.uri)
        return f"{size / 2**20:.0f} MiB copied to {self.uri}"
