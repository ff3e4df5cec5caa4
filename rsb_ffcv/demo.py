"""`make demo`: the main job on the bundled demo data — write the demo betons, then train on them."""
import sys
import time
from pathlib import Path

from .datasets.cli import main as write_main
from .train import main as train_main


def main(argv=None) -> int:
    rc = write_main([])
    if rc:
        return rc
    run_dir = f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"  # a fresh run each time: nothing is overwritten
    config = Path(__file__).resolve().parents[1] / "rsb_configs" / "demo.yaml"  # data paths: relative to cwd
    return train_main(["--config", str(config), f"--logging.run_dir={run_dir}", *(argv or sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
