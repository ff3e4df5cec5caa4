"""The GPU check's CPU rehearsal: every stage runs (toy sizes) and its JSON holds real figures. On a machine
with a GPU the same stages run there via scripts/gpu_check.sh."""
import json

from conftest import run_cli


def test_gpu_check_rehearses_every_stage_on_cpu(tmp_path):
    out = tmp_path / "check"
    p = run_cli("-m", "rsb_ffcv.gpu_check", "--device=cpu", "--quick", f"--out-dir={out}", "--budget-s=900",
                "--no-compile", timeout=1200)
    r = json.loads((out / "gpu_check.json").read_text())
    assert r["passed"] and r["machine"]["gpu"] is None
    assert r["loader_gpu_equals_cpu"]["equal"] and r["randaugment_gpu_equals_cpu"]["max_abs_diff"] == 0
    losses = r["train_steps_eager"]["losses"]
    assert losses[-1] < losses[0] and r["train_steps_eager"]["soft_targets"]
    assert r["bench_augment"]["rows"][0]["ours_images_per_s"] > 0
    assert r["bench_train_a3"]["real_images_per_s"] > 0 and 0 <= r["bench_train_a3"]["data_stall_fraction"] < 1
    assert (out / "bench_train_a3.png").stat().st_size > 1000
    assert p.stdout.strip().splitlines()[-1].startswith("bench_train_a3")  # the table comes last


def test_budget_skips_stages_instead_of_overrunning(tmp_path):
    out = tmp_path / "check"
    run_cli("-m", "rsb_ffcv.gpu_check", "--device=cpu", "--quick", f"--out-dir={out}", "--budget-s=0", timeout=600)
    r = json.loads((out / "gpu_check.json").read_text())
    assert all("skipped" in r[k] for k in ("loader_gpu_equals_cpu", "train_steps_eager", "bench_train_a3"))
