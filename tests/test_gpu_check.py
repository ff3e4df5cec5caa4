"""The GPU check's CPU rehearsal: every stage runs (toy sizes) and its JSON holds real figures. On a machine
with a GPU the same stages run there via scripts/gpu_check.sh."""
import json

from conftest import run_cli


def test_gpu_check_rehearses_every_stage_on_cpu(tmp_path):
    out = tmp_path / "check"
    p = run_cli("-m", "rsb_ffcv.gpu_check", "--gpu_check.device=cpu", "--gpu_check.quick=true",
                f"--gpu_check.out_dir={out}", "--gpu_check.budget_s=900", "--gpu_check.compile=false", timeout=1200)
    r = json.loads((out / "gpu_check.json").read_text())
    assert r["passed"] and r["machine"]["gpu"] is None and r["skipped"] == [] and r["failed"] == []
    assert r["loader_gpu_equals_cpu"]["equal"] and r["randaugment_gpu_equals_cpu"]["max_abs_diff"] == 0
    losses = r["train_steps_eager"]["losses"]
    assert losses[-1] < losses[0] and r["train_steps_eager"]["soft_targets"]
    assert r["bench_augment"]["rows"][0]["ours_images_per_s"] > 0
    for name in ("bench_train_a3", "bench_train_a1"):
        assert r[name]["real_images_per_s"] > 0 and 0 <= r[name]["data_stall_fraction"] < 1
        assert 0 <= r[name]["data_wait_fraction"] < 1
    a1 = r["bench_train_a1"]["settings"]  # one process: repeated augmentation over 4 virtual ranks
    assert (a1["accumulation"], a1["repeated_aug"]) == (4, 3)
    assert len(list(out.glob("*.beton"))) == 1  # one corpus beton, shared by every stage
    assert r["randaugment_host_syncs"]["torch_calls_that_sync"] <= 2 and r["randaugment_host_syncs"]["passed"]
    assert r["timm_pipeline_a3"]["images_per_s"] > 0 and r["derived"]["ours_vs_timm_pipeline"] > 0
    assert [row["threads"] for row in r["loader_scaling"]["rows"]][0] == 1 and r["profile_a3_step"]["top"]
    assert p.stdout.strip().splitlines()[-1] == "PASSED"


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
