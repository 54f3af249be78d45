"""`--config FILE` for every script: a JSON or YAML file sets any flag, the command line overrides it.

Keys are the flags' names, with dashes or underscores (`learning-rate`, `learning_rate`); values are
what the flag takes (`true`/`false` for switches). A run's own `training_config.json` is a valid
config: its `arguments` are read. Every value goes through the flag's own type and choices, and an
unknown key is refused in one line naming the file and the key.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reasonforge.core import DuplicateKey, UserError, first_line, unique_keys

# what training_config.json's `arguments` also records: where the values came from, not values to set
RECORDED_NOT_FLAGS = ("config", "settings_from")


def add_config_flag(parser: argparse.ArgumentParser, example: str = "") -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=f"JSON or YAML file of this script's flag values{example}; flags on the command line "
                             "override it")


def read_config(path: str) -> tuple[dict, bool]:
    """(flag values, whether the file is a training run's training_config.json)."""
    file = Path(path)
    if file.is_dir():
        raise UserError(f"--config {path} is a folder; pass a JSON or YAML file of flag values")
    if not file.is_file():
        raise UserError(f"--config {path}: no such file; pass a JSON or YAML file of flag values")
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some Windows editors write, is not content
    except UnicodeDecodeError as exc:
        raise UserError(f"--config {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        "save it as UTF-8") from None
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text, object_pairs_hook=unique_keys)
    except DuplicateKey as exc:
        raise UserError(f"--config {path}: the key {exc.args[0]!r} appears twice; keep one of them") from None
    except Exception as exc:  # json and yaml raise their own kinds, each naming the line
        raise UserError(f"--config {path} is not valid {'YAML' if file.suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                        f"({first_line(exc, 160)}); fix the file") from None
    run_config = isinstance(data, dict) and isinstance(data.get("arguments"), dict)
    if run_config:
        data = data["arguments"]  # a run's training_config.json
    if not isinstance(data, dict):
        raise UserError(f"--config {path} holds a {type(data).__name__}, not a mapping of flag names to values")
    return data, run_config


def _coerce(action: argparse.Action, key: str, value, path: str):
    flag = action.option_strings[-1] if action.option_strings else key
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool) and value is not None:
            raise UserError(f"--config {path}: {key} is a switch ({flag}); give it true or false, not {value!r}")
        if isinstance(action, argparse._StoreFalseAction) and action.default is None and value is not None:
            return value  # a tri-state switch (None = decided later): the file states the value itself
        return value
    if value is None:
        if action.default is None:
            return None
        raise UserError(f"--config {path}: {key} is null; give {flag} a value, or leave the key out for its default")
    if isinstance(value, float) and action.type is int:
        if not value.is_integer():
            raise UserError(f"--config {path}: {key} {value!r} is not a whole number, as {flag} needs")
        value = int(value)
    if action.type in (None, str) and isinstance(value, (list, tuple, dict)):
        # the flag's own text form: target_modules [q_proj, v_proj] is "q_proj,v_proj"; column_map a mapping is "a=b,c=d"
        if not all(isinstance(v, (str, int, float)) for v in (value.values() if isinstance(value, dict) else value)):
            raise UserError(f"--config {path}: {key} holds nested values; write it as {flag} takes it on the command line")
        value = ",".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else ",".join(map(str, value))
    elif action.type in (None, str) and not isinstance(value, str):
        value = str(value).lower() if isinstance(value, bool) else str(value)
    if action.type is not None and not (isinstance(value, (int, float)) and action.type in (int, float)
                                        and not isinstance(value, bool)):
        try:
            value = action.type(str(value) if not isinstance(value, str) else value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise UserError(f"--config {path}: {key} {value!r} is not valid for {flag} ({first_line(exc, 80)})") from None
    elif action.type is float and isinstance(value, int):
        value = float(value)
    if action.choices is not None and value not in action.choices:
        raise UserError(f"--config {path}: {key} {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def given_on_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the flags written in argv (`--flag value` or `--flag=value`)."""
    by_option = parser._option_string_actions
    given = set()
    for token in argv:
        if token.startswith("--"):
            action = by_option.get(token.split("=", 1)[0])
            if action is not None:
                given.add(action.dest)
    return given


# int flags past this are refused by name (--seed has its own range): a batch of 10^20 reached
# itertools.islice deep inside the Trainer as a traceback
INT_MAX = 2**31 - 1


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """argparse's own mistakes (an invalid int, an unknown choice, a missing argument) as UserError,
    so that they end in the suite's one `error:` line and exit 2, not a usage block."""

    def error(message: str):
        raise UserError(f"{message}; see {parser.prog} --help")

    parser.error = error
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                one_line_errors(sub)


def int_problems(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    return [f"{a.option_strings[-1]} {getattr(args, a.dest)} is too large (at most {INT_MAX:,})"
            for a in parser._actions
            if a.type is int and a.dest != "seed" and isinstance(getattr(args, a.dest, None), int)
            and abs(getattr(args, a.dest)) > INT_MAX]


# Flags naming a file, folder, model or dataset: "" would be read as the working folder.
PATH_WORDS = ("path", "dir", "file", "model", "dataset", "adapter")


def empty_path_problems(parser: argparse.ArgumentParser, args) -> list[str]:
    return [f"{a.option_strings[0]} is empty; give it a path (or leave the flag out for its default)"
            for a in parser._actions
            if a.option_strings and any(w in a.dest for w in PATH_WORDS) and getattr(args, a.dest, None) == ""]


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """parser.parse_args with --config FILE's values as defaults. The namespace also carries
    `settings_from` ({dest: "command line" | "config"} for every value not left at its default)."""
    import sys

    one_line_errors(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    from_file: dict = {}
    if known.config:
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
        values, run_config = read_config(known.config)
        for key, value in values.items():
            dest = str(key).replace("-", "_")
            if dest in RECORDED_NOT_FLAGS and run_config:
                continue  # what the run recorded about its own settings, not a setting
            if dest == "config":
                raise UserError(f"--config {known.config} names another config file; put its values in this one")
            if dest not in actions:
                if run_config:
                    raise UserError(f"--config {known.config} is a training run's config, whose settings are "
                                    f"train_lora.py's ({key!r} is not a flag of this script); pass it to train_lora.py")
                close = [d for d in actions if d.startswith(dest[:4])][:3]
                raise UserError(f"--config {known.config}: {key!r} is not a flag of this script"
                                + (f" (did you mean {', '.join(close)}?)" if close else "")
                                + "; remove it or fix its name")
            from_file[dest] = _coerce(actions[dest], str(key), value, known.config)
        parser.set_defaults(**from_file)
        for dest in from_file:  # a required flag the file gives is given
            actions[dest].required = False
    args = parser.parse_args(argv)
    too_large = int_problems(parser, args) + empty_path_problems(parser, args)
    if too_large:
        raise UserError("; ".join(too_large))
    given = given_on_command_line(parser, argv)
    args.settings_from = {dest: ("command line" if dest in given else "config")
                          for dest in sorted(given | set(from_file)) if dest != "config"}
    return args


def describe_sources(settings_from: dict, config: str | None) -> str | None:
    """One line for a banner: how many values came from where."""
    if not settings_from:
        return None
    files = sum(1 for s in settings_from.values() if s == "config")
    line = sum(1 for s in settings_from.values() if s == "command line")
    parts = ([f"{files} from --config {config}"] if files else []) + ([f"{line} from the command line"] if line else [])
    return ", ".join(parts) + "; the rest are defaults"
