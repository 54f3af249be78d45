"""The folder where compiled graphs and kernels outlive a run (--compile-cache-dir), so the next run skips the compile."""

from __future__ import annotations

import os
from pathlib import Path

from reasonforge.core import UserError

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


def use(folder: str | None, backend: str) -> str:
    """Point the compile caches at `folder` (made if missing); returns the banner's account of it.

    Must run before Unsloth is imported, which reads its folder once. A variable the user set
    already wins. Folders are made owner-only because Unsloth refuses to load its bundle from a
    folder others can write (the artifacts are executable).
    """
    if backend != "unsloth":
        return "none (nothing is compiled on this backend)"
    if not folder or folder.lower() in OFF:
        return "torch's and Unsloth's own defaults (--compile-cache-dir none)"
    root = Path(folder).expanduser().resolve()
    kept = []
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for var, sub in FOLDERS.items():
            if os.environ.get(var):
                kept.append(var)
                continue
            (root / sub).mkdir(exist_ok=True, mode=0o700)
            os.environ[var] = str(root / sub)
    except OSError as e:
        raise UserError(f"--compile-cache-dir {folder}: cannot make it ({e.strerror}); pass a folder you can write, "
                        "or none for torch's own /tmp caches") from e
    files, size = footprint(root)
    state = f"{files} files, {size / 2**20:.0f} MiB from earlier runs" if files else "empty: this run fills it"
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
