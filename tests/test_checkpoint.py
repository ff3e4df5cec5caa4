"""Atomic checkpoints: a failed save leaves the previous checkpoint intact."""
import os
import subprocess

import pytest
import torch

from rsb_ffcv import checkpoint
from rsb_ffcv.config import ConfigError


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs mounts to simulate a full disk")
    try:
        checkpoint.save_atomic({"w": torch.ones(1000)}, mnt / "last.pt")  # 4 KB: fits
        with pytest.raises(Exception):
            checkpoint.save_atomic({"w": torch.zeros(1_000_000)}, mnt / "last.pt")  # 4 MB: disk full
        assert sorted(p.name for p in mnt.iterdir()) == ["last.pt"]  # no temp file left behind
        assert torch.equal(checkpoint.load(mnt / "last.pt")["w"], torch.ones(1000))
    finally:
        subprocess.run(["umount", str(mnt)])


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
