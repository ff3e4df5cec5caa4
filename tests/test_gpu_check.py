"""The GPU check's budget rule. The CPU rehearsal of every stage (toy sizes, real figures in its JSON) runs once in
the suite, as it will on a GPU node: through scripts/gpu_check.sh with the offline bundle (tests/test_offline_kit.py)."""
import json

from conftest import run_cli


def test_a_stage_skipped_for_time_fails_the_check_unless_allowed(tmp_path):
    out = tmp_path / "check"
    p = run_cli("-m", "rsb_ffcv.gpu_check", "--gpu_check.device=cpu", "--gpu_check.quick=true",
                f"--gpu_check.out_dir={out}", "--gpu_check.budget_s=0", check=False, timeout=600)
    r = json.loads((out / "gpu_check.json").read_text())
    assert all("skipped" in r[k] for k in ("loader_gpu_equals_cpu", "train_steps_eager", "bench_train_a3"))
    assert p.returncode == 1 and not r["passed"] and "allow_skip" in p.stdout.strip().splitlines()[-1]
    p = run_cli("-m", "rsb_ffcv.gpu_check", "--gpu_check.device=cpu", "--gpu_check.quick=true",
                f"--gpu_check.out_dir={out}", "--gpu_check.budget_s=0", "--gpu_check.allow_skip=true", timeout=600)
    assert json.loads((out / "gpu_check.json").read_text())["passed"]
