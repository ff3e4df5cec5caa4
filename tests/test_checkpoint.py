"""Atomic checkpoints: a failed or killed save leaves the previous checkpoint intact."""
import signal

import pytest
import torch
from conftest import metrics, run_cli, tiny_args

from rsb_ffcv import checkpoint, stops
from rsb_ffcv.config import ConfigError


def test_failed_save_keeps_previous_checkpoint(small_disk):
    checkpoint.save_atomic({"w": torch.ones(1000)}, small_disk / "last.pt")  # 4 KB: fits
    with pytest.raises(RuntimeError, match="inline_container"):  # torch's zip writer: the disk is full
        checkpoint.save_atomic({"w": torch.zeros(1_000_000)}, small_disk / "last.pt")  # 4 MB
    assert sorted(p.name for p in small_disk.iterdir()) == ["last.pt"]  # no temp file left behind
    assert torch.equal(checkpoint.load(small_disk / "last.pt")["w"], torch.ones(1000))


def test_resume_sources(tmp_path):
    assert checkpoint.resolve_resume("", tmp_path) is None
    assert checkpoint.resolve_resume("auto", tmp_path) is None  # nothing yet: a fresh run
    checkpoint.save_atomic({"epoch": 1}, tmp_path / "last.pt")
    assert checkpoint.resolve_resume("auto", tmp_path) == tmp_path / "last.pt"
    with pytest.raises(ConfigError, match="no such checkpoint"):
        checkpoint.resolve_resume(str(tmp_path / "nope.pt"), tmp_path)
    with pytest.raises(ConfigError, match="ENTITY/PROJECT/NAME:ALIAS"):
        checkpoint.resolve_resume("wandb:just-a-name", tmp_path)
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        checkpoint.load(tmp_path / "bad.pt")


@pytest.mark.slow
def test_a_save_killed_halfway_leaves_a_last_pt_that_loads(demo_betons, tmp_path):
    """SIGKILL in the middle of writing the checkpoint of step 3 (a node losing power, the OOM killer): last.pt is
    still step 2's, whole; the resumed run removes the torn temporary file and completes, every step logged once."""
    run_dir = tmp_path / "torn"
    args = tiny_args(demo_betons, run_dir, "--training.checkpoint_every_min=1e-9", "--training.resume=auto")
    p = run_cli("-m", "rsb_ffcv.train", *args, check=False, env_extra={stops.TEAR_HOOK: "3"})
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    torn = sorted(run_dir.glob(".last.tmp-*.pt"))
    assert len(torn) == 1 and torn[0].stat().st_size > 0
    with pytest.raises(ConfigError, match="cannot be read"):
        checkpoint.load(torn[0])  # what a torn last.pt would have been
    assert checkpoint.load(run_dir / "last.pt")["step"] == 2
    p = run_cli("-m", "rsb_ffcv.train", *args)
    assert f"removed {torn[0]}: a checkpoint write that was killed" in p.stdout and not torn[0].exists()
    assert "resumed from" in p.stdout and p.stdout.split("resumed from")[1].splitlines()[0].endswith("step 2")
    assert [m["step"] for m in metrics(run_dir) if "train/lr" in m] == list(range(1, 7))
    assert checkpoint.load(run_dir / "last.pt")["step"] == 6
