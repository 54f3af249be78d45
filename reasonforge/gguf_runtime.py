"""Running a GGUF file: evaluation's and chat's model over llama-cpp-python (or, as a fallback,
transformers' GGUF loader), with the suite's own prompt rendering and stop tokens, so that what is
measured is the exported file. Making the file is reasonforge.gguf."""

from __future__ import annotations

import atexit
import os
import struct
import time
from pathlib import Path
from types import SimpleNamespace

from reasonforge.core import MAX_SEQ_LENGTH, UserError, first_line, log, read_json
from reasonforge.gguf import EXPORT_INFO, FILE_TYPES, INSTALL, dist_version, require

class GGUFModel:
    """A GGUF file under llama.cpp, offering what the suite's generation and perplexity use. Token
    ids come from the Hugging Face tokenizer saved beside the file (the GGUF's vocabulary is the
    same), so prompts, masks and stop tokens are those of the adapter's own evaluation."""

    is_gguf = True

    @property
    def device(self):
        import torch

        return torch.device("cpu")  # where the prompt's ids are built; llama.cpp takes them as a list

    def __init__(self, path: Path, n_ctx: int, threads: int | None = None):
        llama_cpp = require("llama_cpp", "running a GGUF file")
        self.path, self.n_ctx = Path(path), n_ctx
        self.threads = threads or max(1, os.cpu_count() or 1)
        try:
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=self.threads, verbose=False)
        except Exception as exc:  # llama.cpp raises ValueError for a file it cannot read
            raise UserError(f"llama.cpp cannot load {path} ({first_line(exc, 160)}); export it again") from exc
        self._scorer = None
        # llama-cpp-python frees its model in __del__, which at interpreter exit runs after the modules
        # it needs are gone and prints a traceback: close while they are still there
        atexit.register(self.close)
        # what generation.context_length reads: the prompt and the reply share llama.cpp's context
        self.config = SimpleNamespace(max_position_embeddings=n_ctx)

    def close(self) -> None:
        for llm in (self.llm, self._scorer):
            if llm is not None:
                llm.close()
        self.llm = self._scorer = None

    def generate(self, prompt: list[int], settings, stops: set[int], max_new: int, on_token=None):
        """(reply ids, stopped) for one prompt: greedy at temperature 0, else llama.cpp's sampler
        with the same temperature, top-p, top-k and repetition penalty."""
        greedy = settings.temperature <= 0
        ids: list[int] = []
        stream = self.llm.generate(prompt, temp=0.0 if greedy else settings.temperature,
                                   top_p=1.0 if greedy else settings.top_p,
                                   top_k=1 if greedy else (settings.top_k or 0), min_p=0.0,
                                   repeat_penalty=settings.repetition_penalty, reset=True)
        for tok in stream:
            if tok in stops:
                return ids, True
            ids.append(tok)
            if on_token is not None:
                on_token(tok)
            if len(ids) >= max_new:
                return ids, False
        return ids, False

    def logits(self, input_ids: list[int]):
        """llama.cpp's next-token logits at every position of `input_ids` (a numpy array)."""
        import numpy as np

        if self._scorer is None:
            llama_cpp = require("llama_cpp", "perplexity of a GGUF file")
            self._scorer = llama_cpp.Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_threads=self.threads,
                                           logits_all=True, verbose=False)
        self._scorer.reset()
        self._scorer.eval(input_ids)
        return np.asarray(self._scorer.scores[: len(input_ids)], dtype=np.float64)

    def nll(self, input_ids: list[int], labels: list[int]) -> tuple[float, int]:
        """Summed negative log-likelihood of the target tokens and their number (labels -100 are context)."""
        import numpy as np

        logits = self.logits(input_ids)
        total, count = 0.0, 0
        for pos in range(len(input_ids) - 1):
            target = labels[pos + 1]
            if target == -100:
                continue
            row = logits[pos]
            top = row.max()
            total += float(top + np.log(np.exp(row - top).sum()) - row[target])
            count += 1
        return total, count


def quantization_of(path: Path) -> str | None:
    """The GGUF's weight type from its own metadata (general.file_type)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    field = GGUFReader(str(path)).fields.get("general.file_type")
    if field is None:
        return None
    value = int(field.parts[field.data[0]][0])
    return FILE_TYPES.get(value, f"file_type {value}")


def export_info(path: Path) -> dict:
    info = Path(path).parent / EXPORT_INFO
    return read_json(info, "GGUF export info") if info.is_file() else {}


def runtime_for(requested: str) -> str:
    """llama.cpp where llama-cpp-python is installed (or asked for); else transformers, said in one line."""
    import importlib.util

    if requested != "auto":
        return requested
    if importlib.util.find_spec("llama_cpp") is not None:
        return "llama.cpp"
    log.info("GGUF: llama-cpp-python is not installed (%s), so transformers runs the file's weights, dequantised; "
             "the numbers measure the export's weights, not llama.cpp's kernels", INSTALL)
    return "transformers"


def load(path: str | Path, max_seq_length: int | None, runtime: str = "auto"):
    """(model, tokenizer, info, recorded run info) of a .gguf file for evaluation and chat: a
    GGUFModel under llama.cpp, or (runtime transformers) a torch model of its dequantised weights."""
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a GGUF file" if path.is_dir() else "does not exist"
        raise UserError(f"GGUF file {str(path)!r} {problem}; export one with python -m reasonforge.gguf export ADAPTER")
    from transformers import AutoTokenizer

    runtime = runtime_for(runtime)
    if runtime == "llama.cpp":
        require("llama_cpp", "running a GGUF file under llama.cpp")
    t0 = time.perf_counter()
    folder = path.parent
    try:
        if (folder / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        else:  # a GGUF from elsewhere: the tokenizer and template are read from the file itself
            tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=path.name)
    except (ValueError, KeyError, OSError, struct.error) as exc:
        raise UserError(f"cannot read the tokenizer of {path} ({type(exc).__name__}: {first_line(exc, 160)}); "
                        "the file is damaged or not a GGUF model: export it again") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    recorded = export_info(path).get("run_info") or {}
    info = {"base_model": str(path), "quantization": quantization_of(path), "load_in_4bit": False, "dtype": None}
    if runtime == "llama.cpp":
        model = GGUFModel(path, n_ctx=max_seq_length or recorded.get("max_seq_length") or MAX_SEQ_LENGTH)
        info.update(backend="llama.cpp", backend_reason="a GGUF file runs under llama.cpp (llama-cpp-python)",
                    runtime=f"llama-cpp-python {dist_version('llama_cpp_python') or '?'}")
    else:
        require("gguf", "reading a GGUF file")
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=path.name)
        except Exception as exc:  # transformers raises ValueError/KeyError/RuntimeError for a file it cannot read
            raise UserError(f"transformers cannot load {path} ({type(exc).__name__}: {first_line(exc, 160)}); "
                            "export it again, or install the gguf extra for llama.cpp") from exc
        model.eval()
        info.update(backend="transformers-gguf", dtype=str(model.dtype).replace("torch.", ""),
                    backend_reason="llama-cpp-python is not installed: the GGUF's weights, dequantised, under transformers",
                    runtime=f"transformers {dist_version('transformers')} (GGUF weights dequantised)")
    info["load_s"] = round(time.perf_counter() - t0, 2)
    return model, tokenizer, info, recorded


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


