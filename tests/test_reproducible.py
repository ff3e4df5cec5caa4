"""Same seed, same weights; a killed run loses only the steps since its last checkpoint, and a resumed one
continues the same W&B run (issue 18). Real betons, real timm, real offline W&B, on the CPU."""
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    child_env,
    ddp_args,
    digests,
    epoch_losses,
    final_weights,
    metrics,
    same_weights,
    step_lrs,
    tiny_args,
    torchrun,
    wandb_run_ids,
)

from rsb_ffcv import distributed, loaders, stops, train
from rsb_ffcv.config import ConfigError, load_config
from rsb_ffcv.tracking import Tracker
from rsb_ffcv.train_config import SECTIONS

# demo.yaml's augmentation (RandAugment, Mixup/CutMix, random bilinear/bicubic crops): every random draw counts
AUGMENTED = ["--augment.rand_augment=rand-m6-mstd0.5-inc1", "--data.train_interpolation=random"]


def fit(argv):
    cfg = load_config(SECTIONS, argv)
    t = train.Trainer(cfg, distributed.init(cfg["training.device"]))
    t.fit()
    t.tracker.finish()
    return t



@pytest.fixture(scope="module")
def augmented(demo_betons, tmp_path_factory):
    """An uninterrupted 1-process run with every random draw on, 2 decode threads (demo.yaml's), no checkpoint
    but at epoch ends."""
    run_dir = tmp_path_factory.mktemp("augmented") / "run"
    fit(tiny_args(demo_betons, run_dir, *AUGMENTED, "--logging.wandb_mode=disabled", "--data.num_workers=2",
                  "--training.checkpoint_every_min=0"))
    return run_dir


@pytest.mark.slow
def test_same_seed_gives_bit_identical_weights_with_any_decode_threads(augmented, demo_betons, tmp_path):
    """Two runs with one seed, with 2 and with 1 decode threads, end with the same weights bit for bit; another
    seed does not (so the comparison can fail). Before the crops were keyed by (seed, rank, epoch, batch, image),
    the crop decoder drew from its threads' unseeded generators and this failed."""
    runs = {}
    for name, extra in [("one_thread", ["--data.num_workers=1"]), ("seed1", ["--training.seed=1"])]:
        fit(tiny_args(demo_betons, tmp_path / name, *AUGMENTED, "--logging.wandb_mode=disabled", *extra))
        runs[name] = final_weights(tmp_path / name)
    assert same_weights(runs["one_thread"], final_weights(augmented))
    assert not same_weights(runs["seed1"], final_weights(augmented))


@pytest.mark.slow
def test_sigkill_after_a_timed_checkpoint_loses_only_the_steps_since(augmented, demo_betons, tmp_path, capsys):
    """checkpoint_every_min (here: due at every step) writes mid-epoch checkpoints; SIGKILL (no chance to save)
    after step 5 loses step 5 only. The resumed run logs each step once, continues the same W&B run id, and ends
    with the per-step learning rates, data orders and bit-identical weights of a run that never checkpointed
    mid-epoch and was never killed."""
    straight = augmented
    killed = tmp_path / "killed"
    argv = tiny_args(demo_betons, killed, *AUGMENTED, "--training.checkpoint_every_min=1e-9")
    p = subprocess.run([sys.executable, "-m", "rsb_ffcv.train", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=child_env(**{stops.SIGNAL_HOOK: "0:5:KILL"}))
    assert p.returncode == -9, p.stderr[-2000:]
    assert "checkpoint at step 4 " in p.stdout
    ck = torch.load(killed / "last.pt", weights_only=True)
    assert (ck["step"], ck["epoch"], ck["epoch_steps_done"]) == (4, 1, 1)  # mid-epoch 1 (3 steps an epoch)
    assert max(m["step"] for m in metrics(killed)) == 5  # step 5 was logged, then lost
    capsys.readouterr()
    fit([*argv, "--training.resume=auto"])
    assert f"resumed from {killed / 'last.pt'}: epoch 1, step 4" in capsys.readouterr().out
    assert [m["step"] for m in metrics(killed) if "train/lr" in m] == [1, 2, 3, 4, 5, 6]
    assert step_lrs(killed) == step_lrs(straight) and digests(killed) == digests(straight)
    assert epoch_losses(killed) == epoch_losses(straight)  # epoch 1's mean includes the steps before the kill
    assert same_weights(final_weights(killed), final_weights(straight))
    ids = wandb_run_ids(killed)
    assert len(ids) == 2 and len(set(ids)) == 1  # two sessions of one W&B run


@pytest.mark.slow
def test_a_run_requeued_before_its_first_checkpoint_keeps_its_wandb_run(demo_betons, tmp_path):
    """Killed before any checkpoint, restarted with resume=auto: it starts over (nothing to resume) in the same
    W&B run, and metrics.jsonl holds only the new run's records."""
    run_dir = tmp_path / "early"
    argv = tiny_args(demo_betons, run_dir, "--training.checkpoint_every_min=0", "--training.epochs=1",
                     "--training.resume=auto")
    p = subprocess.run([sys.executable, "-m", "rsb_ffcv.train", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=child_env(**{stops.SIGNAL_HOOK: "0:2:KILL"}))
    assert p.returncode == -9 and not (run_dir / "last.pt").exists(), p.stderr[-2000:]
    assert [m["step"] for m in metrics(run_dir)] == [1, 2]
    fit(argv)
    assert [m["step"] for m in metrics(run_dir) if "train/lr" in m] == [1, 2, 3]
    ids = wandb_run_ids(run_dir)
    assert len(ids) == 2 and len(set(ids)) == 1


@pytest.mark.slow
def test_a_killed_then_a_frozen_rank_restart_the_group_from_the_last_checkpoint(ddp_reference, demo_betons, tmp_path):
    """torchrun --max-restarts=2, checkpoints due at every step. Attempt 0: rank 1 is SIGKILLed after step 5;
    torchrun stops rank 0 and starts both again, and they resume from the last checkpoint (step 4: the ranks agree
    one step after it is due). Attempt 1: rank 1 freezes (SIGSTOP) after step 8, as in a hung collective or a stuck
    read, with no signal to anyone: rank 0 fails after training.dist_timeout_min with one line naming rank 1,
    torchrun kills the frozen process and starts both again, and they resume from step 7 (the save of step 8 was
    the collective that hung). The run ends with the learning rates, orders and weights of the uninterrupted run."""
    run_dir = tmp_path / "elastic"
    p = torchrun("--max-restarts=2", "-m", "rsb_ffcv.train",
                 *ddp_args(demo_betons, run_dir, "--training.checkpoint_every_min=1e-9", "--training.resume=auto",
                           "--training.dist_timeout_min=0.2"),
                 timeout=600, env_extra={stops.SIGNAL_HOOK: "1:5:KILL@0,1:8:STOP@1"})
    resumed = [line for line in p.stdout.splitlines() if line.startswith("resumed from")]
    assert [line.rsplit(" ", 1)[-1] for line in resumed] == ["4", "7"], p.stdout[-3000:]
    assert ("error: a collective got no answer within training.dist_timeout_min=0.2: rank(s) 1 stopped answering; "
            "exiting so that torchrun --max-restarts") in p.stderr, p.stderr[-3000:]
    assert [m["step"] for m in metrics(run_dir) if "train/lr" in m] == list(range(1, 13))
    assert step_lrs(run_dir) == step_lrs(ddp_reference) and digests(run_dir) == digests(ddp_reference)
    assert same_weights(final_weights(run_dir), final_weights(ddp_reference))


def test_a_timeout_of_zero_is_refused():
    with pytest.raises(ConfigError, match=r"training.dist_timeout_min=0: must be more than 0"):
        distributed.init("cpu", timeout_min=0)


def test_signal_hook_spec():
    assert stops.parse_signal_hook("0:3, 1:4:KILL, 2:5:STOP", 0, False) == {(0, 3): 15, (1, 4): 9, (2, 5): 19}
    assert stops.parse_signal_hook("0:3, 1:4:KILL@0, 1:8:STOP@1", 1, True) == {(1, 8): 19}  # a resumed attempt 1
    assert stops.parse_signal_hook("0:3, 1:4:KILL@0, 1:8:STOP@1", 0, False) == {(0, 3): 15, (1, 4): 9}
    for bad in ("x", "0:3:HUP", "0", "1:2:3:4", "1:2@x"):
        with pytest.raises(ConfigError, match=f"{stops.SIGNAL_HOOK}='{bad}': expected RANK:STEP"):
            stops.parse_signal_hook(bad, 0, False)


def test_the_local_rank_picks_the_device_and_the_global_rank_the_data(monkeypatch):
    """Rank 3 of 4, node-local rank 1 of 2, on a node with 2 GPUs: it takes cuda:1 (its global rank would name a
    device the node does not have)."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "new_group", lambda **kw: "gloo group")
    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    d = distributed.init("auto")
    assert (d.rank, d.world, d.local_rank, d.local_world, d.device, chosen) == (3, 4, 1, 2, torch.device("cuda", 1), [1])
    assert not d.is_main


def _children(pid: int) -> list[int]:
    """pid's descendants (from /proc's children lists)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *_children(int(child))]
    return found


def test_a_dead_wandb_service_does_not_stop_the_run(tmp_path, capsys):
    """Slurm's SIGTERM reaches every process of a job step, W&B's service too: logging goes on to metrics.jsonl
    with one line saying so, and the run goes on."""
    (tmp_path / "again").mkdir()
    tracker = Tracker(tmp_path, {"a": 1}, mode="offline", project="p", entity="", name="n")
    tracker.log({"train/loss": 1.0}, step=1)
    before = set(_children(os.getpid()))
    assert before, "W&B runs its service as a child process"
    for pid in before:
        os.kill(pid, signal.SIGTERM)
    for step in range(2, 5):
        time.sleep(0.5)
        tracker.log({"train/loss": 1.0 / step}, step=step)
    tracker.summary(final=1.0)
    tracker.finish(0)
    assert capsys.readouterr().out.count("W&B stopped working") == 1
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4]
    assert tracker.run_id and tracker.offline_dir is not None  # still known for the report and a resume
    again = Tracker(tmp_path / "again", {"a": 1}, mode="offline", project="p", entity="", name="n")
    again.log({"train/loss": 1.0}, step=1)
    again.finish(0)
    assert "W&B stopped working" not in capsys.readouterr().out


def test_an_epoch_left_early_does_not_change_the_next_epochs_batches(demo_betons):
    """An epoch left after one batch (a step cap, a stop, a resumed epoch that was already done), then the next epoch
    at once: its batches are those of a loader that starts there. (FFCV's close() only flags its thread, which went on
    writing the loader's batch buffers while the next epoch's thread used them: different batches every time.)"""
    def loader():
        return loaders.train_loader(f"{demo_betons}/train.beton", 8, 32, torch.device("cpu"), num_workers=1, seed=0,
                                    repeats=0, rank=0, world=1, batches_ahead=2)[0]

    def first_batches(ld, epoch, n):
        ld.next_epoch = epoch
        with contextlib.closing(loaders.epoch(ld, 1)) as it:
            return [next(it)[0].clone() for _ in range(n)]
    want = first_batches(loader(), 1, 6)
    for _ in range(3):
        ld = loader()
        first_batches(ld, 0, 1)
        assert all(torch.equal(a, b) for a, b in zip(first_batches(ld, 1, 6), want, strict=True))
