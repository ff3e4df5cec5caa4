"""What only a multi-GPU run would show, proven on CPU twins (gloo, several processes): ranks that stop together
and resume exactly, BatchNorm statistics reduced before evaluating and saving, the virtual-rank data order for
repeated augmentation and accumulation, DDP's no_sync, and torch.compile under DDP."""
import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ROOT,
    ddp4_args,
    ddp_args,
    digests,
    epoch_losses,
    final_weights,
    metrics,
    same_weights,
    step_losses,
    step_lrs,
    tiny_args,
    torchrun,
)

from rsb_ffcv import distributed, loaders, stops, train
from rsb_ffcv.augment import Normalize
from rsb_ffcv.config import ConfigError, load_config
from rsb_ffcv.train_config import SECTIONS
from rsb_ffcv.weights import load_model


@pytest.fixture(scope="module")
def straight(demo_betons, tmp_path_factory):
    """An uninterrupted, compiled 2-process run: 4 epochs x 3 steps, offline W&B."""
    run_dir = tmp_path_factory.mktemp("ddp") / "straight"
    p = torchrun("-m", "rsb_ffcv.train", *ddp_args(demo_betons, run_dir, "--model.compile=true",
                                                   "--logging.wandb_mode=offline"))
    return run_dir, p


@pytest.mark.slow
def test_two_process_compiled_run_trains_logs_once_and_saves_plain_keys(straight):
    run_dir, p = straight
    assert p.stdout.count("final val top-1") == 1 and p.stdout.count("2 process(es) on cpu") == 1
    assert p.stdout.count("data.in_memory=false:") == 1 and "page-local order, windows of 1 page x" in p.stdout
    vals = [m for m in metrics(run_dir) if "val/images" in m]
    assert [m["val/images"] for m in vals] == [60] * 4  # every val image exactly once across ranks
    losses = [m["train/epoch_loss"] for m in metrics(run_dir) if "train/epoch_loss" in m]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1
    ck = torch.load(run_dir / "last.pt", weights_only=True)
    assert ck["step"] == 12  # the checkpoint holds the plain module's keys, not DDP's or torch.compile's
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])


@pytest.mark.slow
def test_ranks_evaluate_and_save_one_model(straight, demo_betons):
    """The ranks trained on different data, so their BatchNorm statistics differ until they are averaged: the
    saved model, evaluated alone, must give the loss and top-1 that the two ranks measured together."""
    run_dir, _ = straight
    logged = [m for m in metrics(run_dir) if "val/loss" in m][-1]
    m = load_model(str(run_dir / "last.pt"), torch.device("cpu"))
    loader = loaders.val_loader(f"{demo_betons}/val.beton", 16, 32, 0.95, torch.device("cpu"), num_workers=1, rank=0,
                                world=1, os_cache=False, batches_ahead=1)
    normalize, loss, hits, n = Normalize(), 0.0, 0, 0
    with torch.no_grad():
        for x, y in loaders.epoch(loader, 1):
            logits = m.model(normalize(x))
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            hits += int((logits.argmax(1) == y).sum())
            n += len(y)
    assert n == 60 and 100 * hits / n == pytest.approx(logged["val/top1"])
    assert loss / n == pytest.approx(logged["val/loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("signals,stopped_at", [("1:4", {5}), ("0:2,1:3", {3, 4})])
def test_a_signal_on_some_ranks_stops_all_at_one_step_and_resume_matches(ddp_reference, demo_betons, tmp_path,
                                                                         signals, stopped_at):
    """SIGTERM on one rank (or on both, at different steps): both ranks leave at the same step, save, exit 0;
    resuming gives the learning rates, data order and bit-identical final weights of the uninterrupted run
    (every rank's random state comes back from the checkpoint)."""
    split = tmp_path / "split"
    p = torchrun("-m", "rsb_ffcv.train", *ddp_args(demo_betons, split), timeout=300,
                 env_extra={stops.SIGNAL_HOOK: signals})
    assert p.stdout.count("stopped by signal at step") == 1, p.stdout[-2000:]
    ck = torch.load(split / "last.pt", weights_only=True)
    assert ck["step"] in stopped_at, ck["step"]
    assert len(ck["rank_states"]) == 2 and not torch.equal(ck["rank_states"][0]["rng"]["torch"],
                                                           ck["rank_states"][1]["rng"]["torch"])
    torchrun("-m", "rsb_ffcv.train", *ddp_args(demo_betons, split, "--training.resume=auto"), timeout=300)
    assert step_lrs(split) == step_lrs(ddp_reference)
    assert digests(split) == digests(ddp_reference) and len(set(digests(split).values())) == 4
    assert same_weights(final_weights(split), final_weights(ddp_reference))
    assert epoch_losses(split) == epoch_losses(ddp_reference)


@pytest.mark.slow
def test_four_processes_stopped_and_resumed_end_bit_identical(ddp4_reference, demo_betons, tmp_path):
    """4 processes (gloo ring: each chunk of a bucket is summed in another rank order), stopped mid-epoch by a
    signal on rank 2 and resumed: every step's loss and the final weights equal the uninterrupted run's bit for
    bit. A fresh DDP buckets its first backward differently from the following ones; the resumed run's first
    step settles the buckets first (recipe.Recipe.settle_ddp_buckets)."""
    split = tmp_path / "split"
    p = torchrun("-m", "rsb_ffcv.train", *ddp4_args(demo_betons, split), nproc=4, timeout=300,
                 env_extra={stops.SIGNAL_HOOK: "2:4"})
    assert p.stdout.count("stopped by signal at step 5") == 1, p.stdout[-2000:]
    torchrun("-m", "rsb_ffcv.train", *ddp4_args(demo_betons, split, "--training.resume=auto"), nproc=4, timeout=300)
    assert step_losses(split) == step_losses(ddp4_reference) and len(step_losses(split)) == 12
    assert step_lrs(split) == step_lrs(ddp4_reference) and digests(split) == digests(ddp4_reference)
    assert same_weights(final_weights(split), final_weights(ddp4_reference))


def _device_batches(demo, world, rank, accum, repeats, epoch=2, batch=8):
    loader, _ = loaders.train_loader(f"{demo}/train.beton", batch, 32, torch.device("cpu"), num_workers=1, seed=5,
                                     repeats=repeats, rank=rank, world=world, accum=accum, batches_ahead=1)
    return loader.traversal_order.sample_order(epoch).reshape(-1, batch).tolist()


@pytest.mark.parametrize("repeats", [3, 0])
def test_one_process_with_accumulation_sees_the_device_batches_of_four(demo_betons, repeats):
    """Virtual ranks: 1 process x 4 micro-batches trains on exactly the device batches of 4 processes x 1, step
    by step (micro-batch k of step i = process k's batch i), and repeated augmentation never puts two copies of
    an image into one device batch."""
    one = _device_batches(demo_betons, 1, 0, 4, repeats)
    four = [_device_batches(demo_betons, 4, r, 1, repeats) for r in range(4)]
    two_by_two = [_device_batches(demo_betons, 2, r, 2, repeats) for r in range(2)]
    assert len(one) == 4 * len(four[0]) > 0
    for i in range(len(four[0])):
        for k in range(4):
            assert one[4 * i + k] == four[k][i] == two_by_two[k // 2][2 * i + k % 2]
    assert Counter(map(tuple, one)) == Counter(tuple(b) for rank in four for b in rank)
    assert all(len(set(b)) == len(b) for b in one)
    if repeats:  # copies of an image go to different device batches: up to `repeats` of them per epoch
        assert max(Counter(i for b in one for i in b).values()) == 3


def test_repeated_aug_needs_as_many_device_batches_per_step_as_repeats(demo_betons, tmp_path):
    with pytest.raises(ConfigError, match="repeated_aug=3 needs at least 3 device batches.*max_device_batch"):
        _device_batches(demo_betons, 1, 0, 2, 3)
    cfg = load_config(SECTIONS, [*tiny_args(demo_betons, tmp_path / "r", "--training.repeated_aug=3",
                                            "--logging.wandb_mode=disabled")])
    with pytest.raises(ConfigError, match="1 process.* x 1 accumulation"):
        train.Trainer(cfg, distributed.init("cpu"))


def test_accumulation_gives_the_parameters_of_one_big_batch(demo_betons, tmp_path):
    """2 micro-batches of 8 then one optimizer step = one batch of 16 (SGD, whose update scales with the
    gradient; BatchNorm in eval mode so that the batch split does not change the forward pass)."""
    common = ["--augment.mixup_alpha=0", "--augment.cutmix_alpha=0", "--lr.warmup_epochs=0", "--optim.opt=sgd",
              "--lr.lr=0.1", "--logging.wandb_mode=disabled"]
    big = train.Trainer(load_config(SECTIONS, tiny_args(demo_betons, tmp_path / "big", *common)), distributed.init("cpu"))
    acc = train.Trainer(load_config(SECTIONS, tiny_args(demo_betons, tmp_path / "acc", *common,
                                                        "--training.max_device_batch=8")), distributed.init("cpu"))
    assert (big.data.accum, acc.data.accum, acc.data.micro_batch) == (1, 2, 8)
    images, labels = big.data.train.first_batch()
    for t in (big, acc):
        t.recipe.set_lr(0, step=0)
        t.recipe.train_model.eval()
    before = [p.detach().clone() for p in big.recipe.model.parameters()]
    for step in range(3):
        big.recipe.train_step(iter([(images, labels)]), step)
        acc.recipe.train_step(iter([(images[:8], labels[:8]), (images[8:], labels[8:])]), step)
    moved = max(float((a.detach() - b).abs().max()) for a, b in zip(big.recipe.model.parameters(), before))
    diff = max(float((a - b).detach().abs().max())
               for a, b in zip(big.recipe.model.parameters(), acc.recipe.model.parameters()))
    assert moved > 1e-3 and diff < 1e-5, (moved, diff)
    for t in (big, acc):
        t.tracker.finish()


@pytest.mark.slow
def test_ddp_accumulation_syncs_gradients_only_on_the_last_micro_batch(demo_betons, tmp_path):
    out = tmp_path / "probe"
    torchrun(str(ROOT / "tests" / "ddp_probe.py"), str(out),
             *tiny_args(demo_betons, tmp_path / "run", "--data.num_workers=1", "--training.max_device_batch=4",
                        "--training.steps_per_epoch=2", "--logging.wandb_mode=disabled"), timeout=300)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:  # 2 steps x 2 micro-batches: the first of each step without gradient all-reduce
        assert (r["accum"], r["steps"], r["forward"], r["no_sync"]) == (2, 2, 4, 2)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # and the last one did all-reduce: equal weights


def test_cudnn_benchmark_is_set_for_cuda_only():
    from rsb_ffcv.recipe import configure_backends
    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        configure_backends(torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is False
        configure_backends(torch.device("cuda", 0))
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = saved
