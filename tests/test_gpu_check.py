"""The GPU check's verdict. The CPU rehearsal of every stage (toy sizes, real figures in its JSON) runs once in the
suite, as it will on a GPU node: through scripts/gpu_check.sh with the offline bundle (tests/test_offline_kit.py)."""
import time

import pytest

from rsb_ffcv import gpu_check
from rsb_ffcv.config import ConfigError


def test_a_stage_skipped_for_time_fails_the_check_unless_allowed(capsys):
    results = {"machine": {}, "corpus": {}}
    deadline = time.perf_counter() + 30
    gpu_check.run_stage(results, "fast", lambda: {"passed": True}, deadline, needs_s=1)
    gpu_check.run_stage(results, "late", lambda: pytest.fail("a stage ran without the time it needs"), deadline,
                        needs_s=60)
    assert results["fast"]["passed"] and results["late"]["skipped"].startswith("time budget:")
    line = gpu_check.verdict(results, allow_skip=False)
    assert line == "FAILED (1 skipped: set gpu_check.allow_skip=true to accept that)"
    assert (results["passed"], results["skipped"], results["failed"]) == (False, ["late"], [])
    assert gpu_check.verdict(results, allow_skip=True) == "PASSED" and results["passed"]
    gpu_check.run_stage(results, "broken", lambda: 1 / 0, deadline, needs_s=0)
    assert results["broken"]["error"] == "ZeroDivisionError: division by zero"
    assert gpu_check.verdict(results, allow_skip=True) == "FAILED (1 failed)" and results["failed"] == ["broken"]
    assert "[late] skipped (time budget:" in capsys.readouterr().out


def test_chosen_stages_run_alone(tmp_path):
    """gpu_check.stages: a follow-up call on a GPU measures only what it names (here on the CPU, at toy sizes)."""
    import json
    chosen = ["randaugment_gpu_equals_cpu", "randaugment_host_syncs_masked"]
    assert gpu_check.check(["--gpu_check.device=cpu", "--gpu_check.quick=true", f"--gpu_check.out_dir={tmp_path}",
                            f"--gpu_check.stages={','.join(chosen)}"]) == 0
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [k for k, v in r.items() if isinstance(v, dict) and "stage_seconds" in v] == chosen
    assert r["randaugment_host_syncs_masked"]["torch_calls_that_sync"] == 0 and r["passed"]
    with pytest.raises(ConfigError, match="gpu_check.stages: no stage named randaugment_syncs here .*"
                                          "randaugment_host_syncs_masked"):
        gpu_check.check(["--gpu_check.device=cpu", f"--gpu_check.out_dir={tmp_path / 'typo'}",
                         "--gpu_check.stages=randaugment_syncs"])
    assert not (tmp_path / "typo").exists()  # refused before any work


def test_the_readmes_follow_up_gpu_call_names_stages_that_exist(capsys):
    """The call README gives for the next GPU session, planned at full size here (plan_only: nothing runs)."""
    import re

    from conftest import ROOT
    readme = (ROOT / "README.md").read_text().replace("\n", " ")
    stages = re.search(r"scripts/gpu_check.sh offline_bundle [^`]*--gpu_check.stages=([\w,]+)`", readme).group(1)
    assert gpu_check.check(["--gpu_check.device=cpu", "--gpu_check.plan_only=true",
                            f"--gpu_check.stages={stages}"]) == 0
    planned = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.endswith("s allowed")]
    assert sorted(planned) == sorted(stages.split(",")) and "bench_train_a3_160px_masked_compiled" in planned
