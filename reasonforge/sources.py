"""Where data_preparation.py's rows come from: the built-in sample, local files (checked for encoding and malformed JSON first), save_to_disk folders and the Hub."""

from __future__ import annotations

import functools
import json
import shutil
import sys
import tempfile
from pathlib import Path

from reasonforge import core
from reasonforge.core import DuplicateKey, unique_keys
from reasonforge.core import UserError

FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

UTF_BOMS = [(b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xff\xfe", "utf-16"),
             (b"\xfe\xff", "utf-16")]


def check_utf8(path: Path) -> None:
    """Refuse a text file that is not UTF-8, naming where it breaks and how to convert it."""
    import codecs

    with open(path, "rb") as fh:
        head = fh.read(4)
        for bom, encoding in UTF_BOMS:
            if head.startswith(bom):
                raise UserError(f"{path} is {encoding.upper()} text, not UTF-8; convert it: "
                                f"iconv -f {encoding} -t utf-8 {path} > {path.with_suffix('.utf8' + path.suffix)}")
        fh.seek(0)
        decoder, offset, lineno = codecs.getincrementaldecoder("utf-8")(), 0, 1
        for block in iter(lambda: fh.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                bad = offset + exc.start
                lineno += block[:exc.start].count(b"\n")
                raise UserError(
                    f"{path} is not UTF-8 (byte 0x{block[exc.start]:02x} at line {lineno}, byte offset {bad}); convert it, "
                    f"e.g. iconv -f latin1 -t utf-8 {path} > {path.with_suffix('.utf8' + path.suffix)} (latin1 or cp1252 for Western text)"
                ) from None
            offset += len(block)
            lineno += block.count(b"\n")


def json_records(path: Path, exact_numbers: bool = False):
    """The records of a JSON / JSON-lines file in order; the first malformed one is named by its line.
    With `exact_numbers`, every number comes back as the text the file writes it with."""
    for _, obj in placed_json_records(path, exact_numbers):
        yield obj


def placed_json_records(path: Path, exact_numbers: bool = False):
    """(where, record) pairs of json_records: "line N" of a JSON-lines file, "item N" of an array."""
    # exact: numbers as the file writes them; NaN (not JSON, but Python writes it) is a missing value
    load = (functools.partial(json.loads, parse_int=str, parse_float=str, parse_constant=_constant,
                              object_pairs_hook=unique_keys) if exact_numbers
            else functools.partial(json.loads, object_pairs_hook=unique_keys))
    with open(path, encoding="utf-8-sig") as fh:  # a UTF-8 byte-order mark is not part of the first record
        head = fh.read(1 << 16).lstrip()
    if not head:
        raise UserError(f"dataset file {path} is empty; point --dataset at a file with records")
    if head.startswith("["):
        try:
            records = load(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as exc:
            raise UserError(f"malformed JSON in {path} at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
        except DuplicateKey as exc:
            raise UserError(f"{path} has a record with the key {exc.args[0]!r} twice; keep one of them "
                            "(a JSON reader would silently keep the last)") from None
        except RecursionError:
            raise UserError(f"{path} nests JSON arrays/objects deeper than the parser allows (about "
                            f"{sys.getrecursionlimit()} levels); a chat record needs a few: flatten the data") from None
        if not records:
            raise UserError(f"{path} is an empty JSON array; it holds no records to prepare")
        for i, obj in enumerate(records):
            if not isinstance(obj, dict):
                raise UserError(f"{path}: item {i} of its JSON array is a {type(obj).__name__}, not an object; "
                                "each record must be one {...} object")
            yield f"item {i}", obj
        return
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = load(line)
            except json.JSONDecodeError as exc:
                if lineno == 1:
                    whole_object_problem(path)
                raise UserError(f"malformed JSON line in {path} at line {lineno}: {exc.msg}; fix or remove that line") from exc
            except DuplicateKey as exc:
                raise UserError(f"{path} line {lineno} has the key {exc.args[0]!r} twice; keep one of them "
                                "(a JSON reader would silently keep the last)") from None
            except RecursionError:
                raise UserError(f"{path} line {lineno} nests JSON arrays/objects deeper than the parser allows (about "
                                f"{sys.getrecursionlimit()} levels); a chat record needs a few: flatten or remove it") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path} line {lineno} is not a JSON object; each line must be one {{...}} record")
            yield f"line {lineno}", obj


def _constant(name: str):
    return None if name == "NaN" else name  # Infinity / -Infinity stay the file's text


def whole_object_problem(path: Path) -> None:
    """A file that is one pretty-printed JSON object (a wrapper like {"data": [...]}, or a config file)
    is not records: say so, and where the records are if a field holds them."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, RecursionError):
        return
    if not isinstance(obj, dict):
        return
    lists = [k for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    if lists:
        raise UserError(f"{path} is one JSON object whose records are under {lists[0]!r}; save that list as the file "
                        f"(e.g. jq '.{lists[0]}' {path} > records.json) and pass it to --dataset")
    raise UserError(f"{path} is one JSON object, not records (a JSON array of objects, or one object per line); "
                    "is it the file you meant to pass to --dataset?")


def record_schema(keys) -> str | None:
    """The schema a record's own fields make (conversations.detect_schema's choice), None for none."""
    from reasonforge.conversations import detect_schema

    try:
        return detect_schema(list(keys), None)[0]
    except UserError:
        return None


def _kind(value) -> str:
    return ("none" if value is None else "bool" if isinstance(value, bool) else "num" if isinstance(value, (int, float))
            else "str" if isinstance(value, str) else "nested")


def check_json_file(path: Path, schemas: dict | None = None) -> dict[str, set[str]]:
    """Check a JSON / JSON-lines file (UTF-8, well-formed, one object per record); returns the kinds
    of value each top-level field holds ("str", "num", "bool", "none", "nested").

    With `schemas` (a dict shared across the files of one dataset), every record must have the
    schema of the first: datasets would read the union of the fields and one schema, and rows of
    the other would come out empty and be dropped."""
    check_utf8(path)
    kinds: dict[str, set[str]] = {}
    for where, obj in placed_json_records(path):
        for key, value in obj.items():
            kinds.setdefault(key, set()).add(_kind(value))
        if schemas is not None:
            schema = record_schema(k for k, v in obj.items() if v is not None)
            if schema is None:
                continue  # no schema at all: the row is dropped and counted as empty, as before
            first = schemas.setdefault("first", (schema, f"{path} {where}"))
            if schema != first[0]:
                raise UserError(
                    f"{path} {where} is a {schema} record, but {first[1]} starts {first[0]} records; one dataset holds "
                    f"one schema: put the {schema} records in a file of their own and prepare it separately, or convert them")
    return kinds


def text_as_written(ds, files: list[str], kinds: dict[str, set[str]]):
    """Fields that hold numbers, or mix text with booleans, read back as the file's text.

    Left to datasets, a number column is typed int64 or float64: 12345678901234567890 became
    12345678901234567168 (or a float), a 400-digit integer became inf and "1.50" came back as 1.5;
    a field mixing text and numbers is typed Json and its strings parsed ("null" became a missing
    value, "[1, 2]" a list). Here every such value is the file's own text, digits as written."""
    text = [k for k, found in kinds.items()
            if "nested" not in found and ("num" in found or ("str" in found and "bool" in found))]
    if not text:
        return ds
    values: dict[str, list] = {key: [] for key in text}
    for f in files:
        for obj in json_records(Path(f), exact_numbers=True):
            for key in text:
                v = obj.get(key)
                values[key].append(None if v is None else v if isinstance(v, str) else json.dumps(v))
    for key in text:
        ds = ds.remove_columns(key).add_column(key, values[key])
    return ds


def without_bom(path: Path, scratch: Path) -> str:
    """`path`, or where it starts with a UTF-8 byte-order mark a copy without it in `scratch`."""
    with open(path, "rb") as fh:
        if fh.read(3) != b"\xef\xbb\xbf":
            return str(path)
        copy = scratch / f"{len(list(scratch.iterdir()))}-{path.name}"
        with open(copy, "wb") as out:
            shutil.copyfileobj(fh, out, 1 << 20)
    return str(copy)


def local_data_files(path: Path) -> tuple[str, list[str]]:
    if path.is_file():
        kind = FILE_TYPES.get(path.suffix.lower())
        if kind is None:
            raise UserError(f"unsupported file type {path.suffix!r} for {path}; use .json, .jsonl, .csv or .parquet")
        return kind, [str(path)]
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in FILE_TYPES)
    kinds = {FILE_TYPES[f.suffix.lower()] for f in files}
    if not files:
        raise UserError(f"folder {path} holds no .json/.jsonl/.csv/.parquet files and is not a save_to_disk folder")
    if len(kinds) > 1:
        raise UserError(f"folder {path} mixes file types {sorted(kinds)}; keep one type per folder")
    return kinds.pop(), [str(f) for f in files]


def load_source(args):
    """Return (Dataset, source description)."""
    import datasets

    name = args.dataset
    if name in ("sample", "sample-easy") and args.split != "train":
        raise UserError(f"the built-in {name} has no splits (data preparation makes its own); drop --split {args.split}")
    if name in ("sample", "sample-easy"):
        from reasonforge import sample_data

        n = args.max_samples or 3000
        return datasets.Dataset.from_list(sample_data.sample_rows(n, seed=1234, level=name)), f"builtin:{name}"
    if core.path_kind(name) == "s3":
        raise UserError(f"--dataset {name} is on S3, which data preparation does not read; copy it here first "
                        f"(aws s3 cp --recursive {name} ./raw_data/) and pass --dataset ./raw_data")
    path = Path(name).expanduser()
    if core.path_kind(name) == "local" or path.suffix.lower() in FILE_TYPES:
        if not path.exists():
            raise UserError(f"dataset path {name!r} does not exist; pass a file, a folder, a Hub id or 'sample'")
        return load_local(path, args.split, check_schemas=not args.column_map), f"local:{path.resolve()}"
    try:
        ds = datasets.load_dataset(name, split=args.split)
    except ValueError as exc:
        raise UserError(f"dataset {name!r} has no split {args.split!r}: {core.first_line(exc)}") from exc
    except Exception as exc:  # the Hub raises many kinds: offline, gated, missing
        raise UserError(
            f"cannot load {name!r} from the Hugging Face Hub ({type(exc).__name__}: {core.first_line(exc, 200)}); "
            "check the id and network, or pass a local file / 'sample'"
        ) from exc
    return ds, f"hub:{name}"


def csv_as_text(files: list[str]) -> dict:
    """Read every CSV column as the text in the file. Left to infer types, pandas turned answers
    '007' into 7, '1.50' into 1.5 and 20-digit numbers into floats, and dropped 'NA', 'None' and
    'null' as missing: training targets and references silently different from the file."""
    import csv

    import datasets

    with open(files[0], newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader(fh), [])
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:  # pandas would keep one of them and drop the other's cells without a word
        raise UserError(f"{files[0]} names the column {', '.join(map(repr, repeated))} more than once in its header; "
                        "rename the columns so that each name is used once")
    if not header:
        return {}  # no header: left to pandas, whose error names the problem
    if len(header) == 1 and any(sep in header[0] for sep in ";\t|"):
        sep = next(s for s in ";\t|" if s in header[0])
        raise UserError(f"{files[0]} has one column {header[0]!r}: it looks {sep!r}-separated, and CSV files here are "
                        "comma-separated; convert it (e.g. python -c \"import csv,sys; csv.writer(sys.stdout).writerows("
                        f"csv.reader(sys.stdin, delimiter='{sep}'))\" < IN > OUT.csv)")
    return {"features": datasets.Features({name: datasets.Value("string") for name in header}),
            "keep_default_na": False, "na_values": [""]}


def load_local(path: Path, split: str, check_schemas: bool = True):
    """A local file or folder as one Dataset; `check_schemas` (off under --column-map, which names
    the columns itself) refuses JSON records of more than one schema."""
    import datasets

    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:  # datasets raises file, JSON and arrow errors for a damaged folder
            raise UserError(f"cannot load the save_to_disk folder {path} ({type(exc).__name__}: "
                            f"{core.first_line(exc, 160)}); save it again or point --dataset at the source files") from exc
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserError(f"{path} has splits {list(loaded)}, not {split!r}; pass --split NAME")
            return loaded[split]
        if split != "train":
            raise UserError(f"{path} holds one dataset without named splits; drop --split {split}")
        return loaded
    if split != "train":  # a file is one split: reading it whole under another name would be a silent mix-up
        raise UserError(f"{path} is read whole (files have no splits); drop --split {split}, which names a split of a "
                        "Hub dataset or a save_to_disk folder")
    kind, files = local_data_files(path)
    kinds: dict[str, set[str]] = {}
    if kind == "json":
        schemas: dict | None = {} if check_schemas else None
        for f in files:
            for key, found in check_json_file(Path(f), schemas).items():
                kinds.setdefault(key, set()).update(found)
    elif kind == "csv":
        for f in files:
            check_utf8(Path(f))
    options = csv_as_text(files) if kind == "csv" else {}
    scratch = tempfile.TemporaryDirectory(prefix="rf-json-") if kind == "json" else None
    if scratch is not None:  # datasets' JSON reader fails on a UTF-8 byte-order mark in some files
        files = [without_bom(Path(f), Path(scratch.name)) for f in files]
    try:
        return _read_files(kind, files, options, kinds, path)
    finally:
        if scratch is not None:
            scratch.cleanup()


def _read_files(kind: str, files: list[str], options: dict, kinds: dict, path: Path):
    import datasets

    try:
        ds = datasets.load_dataset(kind, data_files=files, split="train", **options)
    except Exception as exc:
        hint = {"json": ("; a field whose values have different structures (a list in one record, an object in "
                         "another) or a number beyond float range (1e400: write it as a string) stops the reader"),
                "csv": "; check that every row has the header's number of columns and that the file has data rows"}
        raise UserError(f"cannot read {path} as {kind}: {core.first_line(exc)}{hint.get(kind, '')}") from exc
    return text_as_written(ds, files, kinds) if kinds else ds

