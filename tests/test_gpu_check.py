"""The GPU check's verdict. The CPU rehearsal of every stage (toy sizes, real figures in its JSON) runs once in the
suite, as it will on a GPU node: through scripts/gpu_check.sh with the offline bundle (tests/test_offline_kit.py)."""
import time

import pytest

from rsb_ffcv import gpu_check


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
