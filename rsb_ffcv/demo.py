"""`make demo`: the main job on the bundled demo data — write the demo betons, then train on them."""
import sys
import time

from .datasets.cli import main as write_main
from .train import main as train_main


def main(argv=None) -> int:
    rc = write_main([])
    if rc:
        return rc
    run_dir = f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"  # a fresh run each time: nothing is overwritten
    return train_main(["--config", "rsb_configs/demo.yaml", f"--logging.run_dir={run_dir}", *(argv or sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
