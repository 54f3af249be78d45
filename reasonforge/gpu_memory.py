"""GPU memory as numbers for reports and metrics, and one line of text for logs (kept apart, as
torchtune's get_memory_stats and log_memory_stats are)."""

from __future__ import annotations


def gpu_memory_stats(device: int | None = None) -> dict[str, float]:
    """Allocated / reserved / peak / total GiB of the current CUDA device; {} without CUDA."""
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    dev = torch.cuda.current_device() if device is None else device
    gib = 1024**3
    return {
        "allocated_gib": torch.cuda.memory_allocated(dev) / gib,
        "reserved_gib": torch.cuda.memory_reserved(dev) / gib,
        "peak_gib": torch.cuda.max_memory_reserved(dev) / gib,
        "total_gib": torch.cuda.get_device_properties(dev).total_memory / gib,
    }


def format_memory_stats(stats: dict[str, float]) -> str:
    if not stats:
        return "GPU memory: n/a (no CUDA device)"
    return (
        f"GPU memory: {stats['allocated_gib']:.2f} GiB allocated, {stats['reserved_gib']:.2f} reserved, "
        f"{stats['peak_gib']:.2f} peak of {stats['total_gib']:.1f} GiB"
    )
