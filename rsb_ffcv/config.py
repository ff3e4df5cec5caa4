"""fastargs glue shared by every entry point: YAML files + `--section.key=value` overrides, strict.

fastargs itself ignores unknown keys, reads every environment variable and parses `bool("false")` as
True; `load_config` adds the checks a user needs (unknown keys and bad values fail with one line naming
the key and the file) and returns the config as a flat dict for logging.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from fastargs import get_current_config
from fastargs.validation import Checker


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is one line that says what to fix."""


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


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _known_keys(config, sections) -> dict:
    return {".".join(path): param for path, param in config.entries.items() if path[0] in sections}


def _parse_argv(argv: list[str], prog: str) -> tuple[list[str], dict]:
    parser = argparse.ArgumentParser(prog=prog, add_help=True,
                                     description="Options: --config FILE.yaml (repeatable), then --section.key=value.")
    parser.add_argument("--config", "-C", "--config-file", action="append", default=[], dest="configs",
                        help="YAML config file (repeatable; later files and CLI overrides win)")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': use --section.key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            key, value = arg[2:], rest[i + 1]
            i += 1
        else:
            raise ConfigError(f"option '{arg}' has no value: use {arg}=VALUE")
        overrides[key] = yaml.safe_load(value) if value != "" else ""
        i += 1
    return args.configs, overrides


def load_config(sections: tuple[str, ...], argv: list[str] | None = None, prog: str | None = None,
                defaults: dict | None = None) -> dict:
    """Collect YAML files and CLI overrides into fastargs' current config, validate, return it flat.

    `sections` are the tool's own fastargs sections (declared by importing their module): fastargs keeps
    one process-wide registry, so another tool's sections may be registered too; only these count.
    """
    config = get_current_config()
    config.content = {}  # a fresh collection each call (tests build several configs in one process)
    known = _known_keys(config, sections)
    argv = sys.argv[1:] if argv is None else argv
    files, overrides = _parse_argv(argv, prog or Path(sys.argv[0]).name)

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
        layers.append((f"config file '{f}'", _flatten(content)))
    layers.append(("command line", overrides))

    for origin, flat in layers:
        for key, value in flat.items():
            if key not in known:
                section = key.split(".")[0]
                hint = sorted(k for k in known if k.startswith(section + "."))
                hint = f"; keys of section '{section}': {', '.join(hint)}" if hint else \
                    f"; sections: {', '.join(sorted({k.split('.')[0] for k in known}))}"
                raise ConfigError(f"unknown key '{key}' in {origin}{hint}")
            config.content[tuple(key.split("."))] = value

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
