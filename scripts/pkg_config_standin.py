#!/usr/bin/env python3
"""A minimal pkg-config for building ffcv from the offline bundle on machines without one: reads NAME.pc
from the directories in PKG_CONFIG_PATH and answers --exists, --cflags, --libs and --modversion."""
import os
import re
import sys


def load(name):
    for d in filter(None, os.environ.get("PKG_CONFIG_PATH", "").split(":")):
        path = os.path.join(d, f"{name}.pc")
        if os.path.isfile(path):
            env = {"pcfiledir": os.path.dirname(os.path.abspath(path))}
            fields = {}
            for line in open(path):
                line = line.strip()
                expand = lambda v: re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), v)  # noqa: E731
                if re.match(r"^\w+=", line):
                    k, v = line.split("=", 1)
                    env[k] = expand(v)
                elif re.match(r"^[\w.]+:", line):
                    k, v = line.split(":", 1)
                    fields[k] = expand(v.strip())
            return fields
    return None


def main(args):
    flags = [a for a in args if a.startswith("--")]
    names = [a for a in args if not a.startswith("--")]
    found = [load(n) for n in names]
    if not names or any(f is None for f in found):
        missing = [n for n, f in zip(names, found) if f is None]
        print(f"Package {' '.join(missing)} was not found in the pkg-config search path", file=sys.stderr)
        print(f"Package {' '.join(missing)} was not found")  # ffcv's setup.py looks for 'not found' on stdout
        return 1
    out = []
    for f in found:
        if "--modversion" in flags:
            out.append(f.get("Version", ""))
        if "--cflags" in flags:
            out.append(f.get("Cflags", ""))
        if "--libs" in flags:
            out.append(f.get("Libs", ""))
    if out:
        print(" ".join(x for x in out if x))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
