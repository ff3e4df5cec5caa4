"""`make demo`: the main job on the bundled demo data — write the demo betons, train on them, report the run.

Besides the run itself (runs/demo-<time>/), writes demo.json there (val top-1, wall time, the machine: the
figure the README quotes, python -m rsb_ffcv.bench figures), the run's report (report/index.html there) and its
best.pt exported for timm and the Hugging Face Hub (export/ there: python -m rsb_ffcv.export)."""
import sys
import time
from pathlib import Path

from .bench.common import machine
from .datasets.cli import main as write_main
from .export import main as export_main
from .files import save_json
from .report import main as report_main
from .tracking import read_metrics
from .train import main as train_main


def main(argv=None) -> int:
    t0 = time.perf_counter()
    rc = write_main([])
    if rc:
        return rc
    run_dir = Path(f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")  # a fresh run each time: nothing is overwritten
    config = Path(__file__).resolve().parents[1] / "rsb_configs" / "demo.yaml"  # data paths: relative to cwd
    rc = train_main(["--config", str(config), f"--logging.run_dir={run_dir}", *(argv or sys.argv[1:])])
    if rc == 0:
        vals = [m for m in read_metrics(run_dir / "metrics.jsonl")[0] if "val/top1" in m]
        if vals:
            save_json(run_dir / "demo.json", {"benchmark": "demo", "machine": machine(), "command": "make demo",
                                              "val_top1": vals[-1]["val/top1"], "epochs": len(vals),
                                              "seconds": round(time.perf_counter() - t0, 1)})
    if rc == 0:  # prints the folder ("exported runs/demo-<time>/export: ...") and how timm loads it
        rc = export_main([f"--export.model={run_dir / 'best.pt'}", f"--export.out={run_dir / 'export'}"])
    if rc == 0:
        rc = report_main([f"--report.runs={run_dir}", f"--report.out={run_dir / 'report'}",
                          "--report.title=rsb_ffcv demo run (resnet10t on the demo data)"])
    return rc


if __name__ == "__main__":
    sys.exit(main())
