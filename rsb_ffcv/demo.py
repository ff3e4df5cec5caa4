"""`make demo`: the main job on the bundled demo data (writes the demo betons, then trains on them)."""
import sys

from .datasets.cli import main as write_main


def main() -> int:
    rc = write_main([])
    return rc


if __name__ == "__main__":
    sys.exit(main())
