"""Atomic checkpoints: a failed save leaves the previous checkpoint intact."""
import pytest
import torch

from rsb_ffcv import checkpoint
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
