"""fastargs glue shared by every entry point: YAML files + `--section.key=value` overrides, strict, and
the `--help` of every CLI.

fastargs itself ignores unknown keys, reads every environment variable and parses `bool("false")` as
True; `load_config` adds the checks a user needs (unknown keys and bad values fail with one line naming
the key and the file) and returns the config as a flat dict for logging. `--help` lists every key of
the tool's sections with its type or choices, its default (or the value the given YAML files set) and
its help text, grouped by section, as fastargs' own help does in ffcv-imagenet.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import yaml
from fastargs import get_current_config
from fastargs.validation import Checker, Float, Int, Str


class ConfigError(ValueError):
    """A usage, configuration or input problem (exit code 2); the message is one line that says what to fix."""


class Choice(Checker):
    """One of a list of strings, listed in the given order (fastargs' OneOf keeps a set)."""

    def __init__(self, choices):
        self.choices = list(choices)

    def check(self, value):
        if value not in self.choices:
            raise ValueError(value)
        return value

    def help(self):
        return "one of " + ", ".join(self.choices)


class BoolStr(Checker):
    """A real boolean: true/false, yes/no, on/off, 1/0 (fastargs' own Bool takes "false" as True)."""

    TRUE, FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}

    def check(self, value):
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        s = str(value).strip().lower()
        if s in self.TRUE:
            return True
        if s in self.FALSE:
            return False
        raise ValueError(value)

    def help(self):
        return "a boolean (true/false)"


def flatten(d: dict, prefix: str = "") -> dict:
    """{'section': {'key': v}} (a YAML config) → {'section.key': v} (the flat config)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def nest(flat: dict) -> dict:
    """The inverse of flatten for a flat config: {'section.key': v} → {'section': {'key': v}}."""
    out: dict = {}
    for key, value in flat.items():
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out


def _known_keys(config, sections) -> dict:
    return {".".join(path): param for path, param in config.entries.items() if path[0] in sections}


def known_keys(sections: tuple[str, ...]) -> set[str]:
    """The keys of these (imported) sections: what load_config accepts for them."""
    return set(_known_keys(get_current_config(), sections))


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we want one error line
        raise ConfigError(f"{message} (see --help)")


def _parse_argv(argv: list[str], prog: str) -> tuple[list[str], dict, bool]:
    """(config files, {key: raw string value}, help asked)."""
    parser = _ArgumentParser(prog=prog, add_help=False)
    parser.add_argument("--config", "-C", "--config-file", action="append", default=[], dest="configs")
    parser.add_argument("--help", "-h", action="store_true")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': use --section.key=value (see --help)")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            key, value = arg[2:], rest[i + 1]
            i += 1
        else:
            raise ConfigError(f"option '{arg}' has no value: use {arg}=VALUE")
        overrides[key] = value
        i += 1
    return args.configs, overrides, args.help


def _from_command_line(raw: str, checker):
    """A command-line string as the parameter's value: string parameters keep it as written (YAML would
    read `1:30` as 90 and `no` as False); others are read as YAML scalars (numbers, booleans)."""
    if isinstance(checker, (Str, Choice)):
        return raw
    return yaml.safe_load(raw) if raw != "" else ""


def _type_name(checker) -> str:
    if isinstance(checker, Choice):
        return "{" + ",".join(checker.choices) + "}"
    return {Int: "INT", Float: "FLOAT", Str: "STR", BoolStr: "BOOL"}.get(type(checker), "VALUE")


def format_help(prog: str, description: str, sections: tuple[str, ...], values: dict, files: list[str]) -> str:
    """Every key of `sections`: --section.key=TYPE, its default or the value from `files`, and its help."""
    config = get_current_config()
    lines = [f"usage: {prog} [--config FILE.yaml ...] [--section.key=VALUE ...]", ""]
    if description:
        lines += [description.strip(), ""]
    lines += ["options:",
              "  --config FILE.yaml, -C FILE.yaml   YAML file of sections and keys (repeatable; later files and",
              "                                     command-line values win)",
              "  --help, -h                         this help (after --config: with the values the files set)", ""]
    wrap = textwrap.TextWrapper(width=110, initial_indent=" " * 6, subsequent_indent=" " * 6)
    for section in sections:
        entries = [(path, param) for path, param in config.entries.items() if path[0] == section]
        desc = config.sections[(section,)].desc if config.sections.get((section,)) else ""
        lines.append(f"{section}:" + (f" {desc}" if desc else ""))
        for path, param in entries:
            key = ".".join(path)
            value = values.get(key)
            if files and value is not None and value != param.default:
                shown = f"{value!r} from the config" + ("" if param.required else f"; default {param.default!r}")
            elif param.required:
                shown = "required"
            else:
                shown = f"default {param.default!r}"
            lines.append(f"  --{key}={_type_name(param.checker)}   [{shown}]")
            lines += wrap.wrap(param.desc) or [""]
        lines.append("")
    return "\n".join(lines)


def load_config(sections: tuple[str, ...], argv: list[str] | None = None, prog: str | None = None,
                defaults: dict | None = None, description: str = "") -> dict:
    """Collect YAML files and CLI overrides into fastargs' current config, validate, return it flat.

    `sections` are the tool's own fastargs sections (declared by importing their module): fastargs keeps
    one process-wide registry, so another tool's sections may be registered too; only these count.
    `--help` prints every key of those sections (with the YAML files' values) and exits with code 0.
    """
    config = get_current_config()
    config.content = {}  # a fresh collection each call (tests build several configs in one process)
    known = _known_keys(config, sections)
    argv = sys.argv[1:] if argv is None else argv
    prog = prog or Path(sys.argv[0]).name
    files, overrides, want_help = _parse_argv(argv, prog)

    layers = [("defaults", defaults or {})]
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise ConfigError(f"config file '{f}' not found")
        try:
            content = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{f}' is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(content, dict):
            raise ConfigError(f"config file '{f}' must hold a mapping of sections")
        layers.append((f"config file '{f}'", flatten(content)))
    layers.append(("command line", overrides))

    for origin, flat in layers:
        for key, value in flat.items():
            if key not in known:
                section = key.split(".")[0]
                hint = sorted(k for k in known if k.startswith(section + "."))
                hint = f"; keys of section '{section}': {', '.join(hint)}" if hint else \
                    f"; sections: {', '.join(sorted({k.split('.')[0] for k in known}))}"
                raise ConfigError(f"unknown key '{key}' in {origin}{hint}")
            if origin == "command line":
                value = _from_command_line(value, known[key].checker)
            config.content[tuple(key.split("."))] = value

    if want_help:
        values = {k: config.content.get(tuple(k.split(".")), known[k].default) for k in known}
        print(format_help(prog, description, sections, values, files))
        raise SystemExit(0)
    resolved = {}
    for key, param in known.items():
        try:
            resolved[key] = config[key]
        except Exception:  # fastargs raises MissingValueError / ValidationError
            got = config.content.get(tuple(key.split(".")))
            if got is None:
                raise ConfigError(f"missing required key '{key}' ({param.desc})") from None
            raise ConfigError(f"bad value for '{key}': got {got!r}, expected {param.checker.help()}") from None
    return resolved


def print_config(flat: dict, file=sys.stdout) -> None:
    width = max(len(k) for k in flat)
    for k in sorted(flat):
        print(f"  {k:<{width}}  {flat[k]}", file=file)
