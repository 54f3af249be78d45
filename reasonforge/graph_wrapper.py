"""--graph-wrapper: Inductor's C++ or Python wrapper for the graphs Unsloth compiles, chosen by run length."""

from __future__ import annotations

import os
import shutil

# The C++ wrapper's one-time build makes the first step slower and every later step faster. This is
# the run length after which it repaid its build with cold compile caches (benchmarks/RESULTS.md,
# cold start), so a short run on a fresh machine is never the slower for it.
CPP_WRAPPER_MIN_STEPS = 150


def configure_compiler(backend: str, wrapper: str = "auto", steps: int | None = None, graphs: bool = False, *,
                       changes) -> str:
    """Choose Inductor's C++ or Python wrapper for the graphs Unsloth compiles; say which and why.

    At small micro-batches the GPU waits on Python to launch kernels; the C++ wrapper launches a
    compiled graph's kernels without the Python loop, but its build makes the first step far
    slower. `auto` takes it only for runs long enough to repay that, and never under CUDA graphs,
    whose replays launch a block's kernels without either wrapper. The setting is made through
    `changes` (the run's ProcessChanges), which puts it back when the run ends.
    """
    if backend != "unsloth":
        return "no compiled graphs on this backend"
    if "TORCHINDUCTOR_CPP_WRAPPER" in os.environ:
        return f"TORCHINDUCTOR_CPP_WRAPPER={os.environ['TORCHINDUCTOR_CPP_WRAPPER']} as set"
    import torch._inductor.config

    short = steps is not None and steps < CPP_WRAPPER_MIN_STEPS
    if wrapper == "python" or (wrapper == "auto" and (graphs or short)):
        changes.setattr(torch._inductor.config, "cpp_wrapper", False)
        why = ("--graph-wrapper python" if wrapper == "python" else
               "CUDA graphs replay the kernels, so the C++ wrapper's build would not pay; --graph-wrapper cpp forces it"
               if graphs else
               f"{steps} planned steps, fewer than the {CPP_WRAPPER_MIN_STEPS} that repay the C++ wrapper's "
               "build; --graph-wrapper cpp forces it")
        return f"Python wrapper ({why})"
    compiler = next((c for c in (os.environ.get("CXX"), "g++", "clang++") if c and shutil.which(c)), None)
    if compiler is None:
        return "Python wrapper: no C++ compiler found (install g++ for faster steps on long runs)"
    changes.setattr(torch._inductor.config, "cpp_wrapper", True)
    why = "--graph-wrapper cpp" if wrapper == "cpp" else f"{steps} planned steps repay its build"
    return f"C++ wrapper ({why}; {compiler}; --graph-wrapper python turns it off)"
