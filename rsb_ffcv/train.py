"""`python -m rsb_ffcv.train --config rsb_configs/a3.yaml [--section.key=value ...]`

One process per device (torchrun for several, on one node or several: NCCL on GPUs, gloo on CPU;
scripts/slurm/rsb.sbatch on Slurm). FFCV streams uint8 crops to the device; RandAugment, normalisation and
Mixup/CutMix run batched there; timm's model, LAMB, cosine schedule and BCE do the rest. Rank 0 logs (W&B +
metrics.jsonl) and saves atomic checkpoints: at each epoch's end, every training.checkpoint_every_min and on
SIGTERM/SIGINT, holding every rank's random state, so that a resumed run (training.resume=auto) continues
exactly as the uninterrupted one would have.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from . import checkpoint, cli, distributed, loaders, train_config
from .augment import TrainAugment
from .config import ConfigError, load_config, print_config
from .datasets.betons import open_dataset
from .files import load_json, save_json
from .loaders import buffer_bytes, progressive_resolution, set_train_resolution, train_loader, val_loader
from .memory import plan_reads
from .recipe import (
    build_loss,
    build_model,
    build_optimizer,
    build_scheduler,
    choose_precision,
    compile_model,
    configure_backends,
)
from .tracking import Tracker, plot_curves, resolve_wandb_mode


class LossNotFinite(cli.RunFailure):
    every_rank = True  # the ranks agree on it


def device_batch(global_batch: int, world: int, max_device_batch: int) -> tuple[int, int]:
    """(per-device micro-batch, accumulation steps) so that micro × world × accum = global batch."""
    if global_batch % world:
        raise ConfigError(f"training.batch_size={global_batch} does not divide over {world} processes")
    per_rank = global_batch // world
    accum = 1
    if max_device_batch and per_rank > max_device_batch:
        accum = math.ceil(per_rank / max_device_batch)
        while per_rank % accum:
            accum += 1
    return per_rank // accum, accum


def nest(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out


class Trainer:
    def __init__(self, cfg: dict, d: distributed.Dist):
        self.cfg, self.d = cfg, d
        self.log = functools.partial(print, flush=True) if d.is_main else (lambda *a, **k: None)
        self.run_dir = Path(cfg["logging.run_dir"])
        self.stop_requested = False  # this rank got a signal
        self.stopping = False  # all ranks agreed to stop at this step

        train_meta = open_dataset(cfg["data.train_dataset"])
        val_meta = open_dataset(cfg["data.val_dataset"])
        self.classes = train_meta["classes"]
        if val_meta["classes"] != self.classes:
            raise ConfigError(
                f"'{cfg['data.train_dataset']}' has {len(self.classes)} classes ({', '.join(self.classes[:3])}, ...) "
                f"but '{cfg['data.val_dataset']}' has {len(val_meta['classes'])} "
                f"({', '.join(val_meta['classes'][:3])}, ...): write the val beton with "
                f"--source.classes_from=<the train beton's .json> so that label i means the same class")
        self.micro_batch, self.accum = device_batch(cfg["training.batch_size"], d.world,
                                                    cfg["training.max_device_batch"])
        if (cfg["augment.mixup_alpha"] > 0 or cfg["augment.cutmix_alpha"] > 0) and self.micro_batch % 2:
            raise ConfigError(f"Mixup/CutMix need an even per-device batch; got {self.micro_batch}")
        resume_path = checkpoint.resolve_resume(cfg["training.resume"], self.run_dir)
        if resume_path is None and (self.run_dir / "last.pt").exists():
            raise ConfigError(f"logging.run_dir '{self.run_dir}' already holds a checkpoint: set "
                              f"training.resume=auto to continue it, or choose another run_dir")

        # test hooks fire only in a run that starts fresh (a resumed or restarted one would kill itself again)
        self.debug_signals = {} if resume_path else parse_debug_signals(cfg["training.debug_signal_at"])
        # W&B's mode now, before building anything: online that cannot connect stops here, auto says offline
        wandb_mode = resolve_wandb_mode(cfg["logging.wandb_mode"], "logging.wandb_mode") if d.is_main else "disabled"
        seed = cfg["training.seed"]
        torch.manual_seed(seed)  # identical initial weights on every rank
        self.device = d.device
        configure_backends(self.device)
        self.precision = choose_precision(cfg["training.precision"], self.device)
        self.model = build_model(cfg["model.arch"], len(self.classes), cfg["model.drop_path"],
                                 cfg["model.channels_last"], self.device)
        self.ema = None
        if cfg["training.ema"]:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model, decay=cfg["training.ema_decay"])
        self.optimizer = build_optimizer(self.model, cfg["optim.opt"], cfg["lr.lr"], cfg["optim.weight_decay"],
                                         cfg["optim.momentum"])
        self.scaler = self.precision.grad_scaler()
        if d.is_main:  # weights, optimizer moments (LAMB/AdamW: 2 per weight, SGD: 1) and EMA
            weights = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
            copies = 1 + (1 if cfg["optim.opt"] == "sgd" else 2) + (1 if self.ema is not None else 0)
            checkpoint.check_free_space(self.run_dir, weights * copies)
        self.ddp = None
        if d.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.train_model = compile_model(self.ddp or self.model, cfg["model.compile"])
        self.agreement = distributed.StepAgreement(d.world)
        self.checkpoint_every_s = 60 * cfg["training.checkpoint_every_min"]
        self.last_save = time.monotonic()

        torch.manual_seed(seed + d.rank)  # augmentation randomness differs per rank
        np.random.seed(seed + d.rank)
        random.seed(seed + d.rank)
        node_share = max(1, len(os.sched_getaffinity(0)) // d.local_world)  # this process's cores of its node
        self.compute_threads = cfg["training.cpu_threads"] or node_share
        workers = cfg["data.num_workers"] or node_share
        print(f"rank {d.rank}/{d.world} (node-local {d.local_rank}/{d.local_world}) on {socket.gethostname()}: "
              f"{self.device}, {self.compute_threads} compute threads, {workers} decode threads", flush=True)
        common = dict(num_workers=workers, batches_ahead=cfg["data.batches_ahead"], decoder=cfg["data.decoder"])
        train_res = max(cfg["resolution.train"], cfg["resolution.progressive_end"])
        buffers = sum(buffer_bytes(self.micro_batch, res, cfg["data.batches_ahead"])
                      for res in (train_res, cfg["resolution.test"]))  # the train and the val loader
        reads = plan_reads(cfg["data.train_dataset"], cfg["data.in_memory"], cfg["data.shuffle_window_mib"],
                           d.local_world, buffers, agree_min=d.all_min)
        self.log(reads.line)
        self.train_loader, self.decoder = train_loader(
            cfg["data.train_dataset"], self.micro_batch, cfg["resolution.train"], self.device, seed=seed,
            repeats=cfg["training.repeated_aug"], rank=d.rank, world=d.world, accum=self.accum,
            window_pages=reads.window_pages, interpolation=cfg["data.train_interpolation"], **common)
        self.val_loader = val_loader(cfg["data.val_dataset"], self.micro_batch, cfg["resolution.test"],
                                     cfg["resolution.test_crop_ratio"], self.device, rank=d.rank, world=d.world,
                                     os_cache=True, interpolation=cfg["data.test_interpolation"], **common)
        self.augment = TrainAugment(len(self.classes), cfg["augment.rand_augment"], cfg["augment.interpolation"],
                                    cfg["augment.mixup_alpha"], cfg["augment.cutmix_alpha"],
                                    cfg["augment.mixup_prob"], cfg["augment.mixup_switch_prob"],
                                    cfg["augment.mixup_mode"], cfg["training.label_smoothing"]).to(self.device)
        self.loss_fn = build_loss(cfg["training.loss"], self.augment.mixup_active, cfg["training.label_smoothing"],
                                  cfg["training.bce_target_thresh"])

        self.steps_per_epoch = len(self.train_loader) // self.accum  # the order holds whole steps
        if cfg["training.steps_per_epoch"]:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg["training.steps_per_epoch"])
        if self.steps_per_epoch == 0:
            raise ConfigError(f"training.batch_size={cfg['training.batch_size']} is larger than an epoch of "
                              f"'{cfg['data.train_dataset']}': lower it")
        self.scheduler, self.total_epochs = build_scheduler(
            self.optimizer, cfg["training.epochs"], self.steps_per_epoch, cfg["lr.warmup_epochs"],
            cfg["lr.warmup_lr"], cfg["lr.min_lr"], cfg["lr.cooldown_epochs"], cfg["lr.step_unit"])

        self.epoch, self.step, self.epoch_steps_done, self.best_top1 = 0, 0, 0, -1.0
        self.epoch_loss = torch.zeros((), device=self.device)  # this rank's sum of step losses in this epoch
        wandb_id = None
        if resume_path is not None:
            ck = checkpoint.load(resume_path, cfg["training.trust_pickles"])
            if not checkpoint.is_ours(ck):
                raise ConfigError(f"training.resume: '{resume_path}' is not an rsb_ffcv checkpoint")
            wandb_id = self.load_state(ck)
            self.log(f"resumed from {resume_path}: epoch {self.epoch}, step {self.step}")
        elif cfg["training.resume"] == "auto":  # requeued before its first checkpoint: the same W&B run again
            wandb_id = load_json(self.run_dir / "run.json", {}).get("wandb_run_id")
        if d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(nest(cfg), sort_keys=True))
        self.tracker = Tracker(self.run_dir, cfg, mode=wandb_mode, project=cfg["logging.wandb_project"],
                               entity=cfg["logging.wandb_entity"], name=cfg["logging.run_name"] or self.run_dir.name,
                               run_id=wandb_id, enabled=d.is_main, key="logging.wandb_mode", from_step=self.step)
        if d.is_main:
            device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
            save_json(self.run_dir / "run.json", {  # how it ran (for python -m rsb_ffcv.report), its W&B run
                "world": d.world, "nodes": d.world // d.local_world, "device": device, "accum": self.accum,
                "device_batch": self.micro_batch, "precision": self.precision.name,
                "data_order": "exact random" if reads.in_memory else "page-local",
                "wandb_run_id": self.tracker.run_id})

    # ---- checkpoints -------------------------------------------------------------------------------
    def state(self, rank_states: list[dict]) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                "epoch_steps_done": self.epoch_steps_done, "best_top1": self.best_top1, "config": self.cfg,
                "classes": self.classes, "arch": self.cfg["model.arch"], "rank_states": rank_states,
                "wandb_run_id": self.tracker.run_id}

    def rank_state(self) -> dict:
        """What differs between ranks: the random states (augmentation, Mixup), the BatchNorm statistics of the
        model and its EMA (each rank updates its own from its batches; dist_bn reduces them at an epoch's end) and
        its sum of this epoch's losses. The weights are the same everywhere; the crops need no state (keyed by
        seed, rank, epoch, batch)."""
        state = {"rng": checkpoint.rng_state(), "buffers": _buffers(self.model), "epoch_loss": self.epoch_loss.item()}
        if self.ema is not None:
            state["ema_buffers"] = _buffers(self.ema.module)
        return state

    def load_state(self, s: dict):
        self.model.load_state_dict(s["model"])
        if self.ema is not None and s.get("ema"):
            self.ema.load_state_dict(s["ema"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scaler.load_state_dict(s["scaler"])
        # The scheduler is not restored: timm's schedulers are functions of (epoch, step) and this run's config
        # (set_epoch_lr); a checkpoint's state would bring back its own stepping unit and lengths.
        self.epoch, self.step, self.best_top1 = s["epoch"], s["step"], s["best_top1"]
        self.epoch_steps_done = s["epoch_steps_done"]
        ranks = s.get("rank_states") or [{"rng": s["rng"]}]  # before 2026-12: rank 0's random state only
        if len(ranks) != self.d.world:
            self.log(f"note: the checkpoint holds the random states of {len(ranks)} process(es) and this run has "
                     f"{self.d.world}: augmentation draws continue from fresh seeds, not as the saved run would have")
        else:
            mine = ranks[self.d.rank]
            checkpoint.set_rng_state(mine["rng"])
            _load_buffers(self.model, mine.get("buffers"))
            self.epoch_loss.fill_(mine.get("epoch_loss", 0.0))
            if self.ema is not None:
                _load_buffers(self.ema.module, mine.get("ema_buffers"))
        return s.get("wandb_run_id")

    def save(self, top1: float | None, log_artifact: bool, end_of_epoch: bool = True):
        """last.pt (and best.pt when top1 is the best so far; a W&B artifact if asked). Every rank calls it:
        rank 0 gathers every rank's rank_state. end_of_epoch=False: a mid-epoch checkpoint, last.pt only."""
        rank_states = self.d.gather(self.rank_state())
        self.last_save = time.monotonic()
        is_best = top1 is not None and top1 >= self.best_top1
        if top1 is not None:
            self.best_top1 = max(self.best_top1, top1)
        if not self.d.is_main:
            return
        state = self.state(rank_states)
        last = checkpoint.save_atomic(state, self.run_dir / "last.pt")
        if not end_of_epoch:
            return
        aliases = ["latest", f"epoch-{self.epoch}"]
        if is_best:
            checkpoint.save_atomic(state, self.run_dir / "best.pt")
            aliases.append("best")
        if log_artifact:
            self.tracker.log_checkpoint(last, aliases, {"epoch": self.epoch, "step": self.step, "val_top1": top1})

    # ---- training ------------------------------------------------------------------------------------
    def check_loss(self, nonfinite: torch.Tensor):
        """Agree across ranks on a NaN/inf loss (one small all-reduce, on the logging step's sync)."""
        if self.d.all_sum([float(nonfinite.item())])[0]:
            raise LossNotFinite(f"loss is not finite at step {self.step} (epoch {self.epoch}); stopped. "
                                f"The last good checkpoint is {self.run_dir / 'last.pt'}")

    def set_epoch_lr(self):
        """The rate for this epoch (step_unit=epoch), or for the next update (update): timm's scheduler."""
        if self.cfg["lr.step_unit"] == "epoch":
            self.scheduler.step(self.epoch)
        else:
            self.scheduler.step_update(num_updates=self.step)

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, sync_grads: bool = True) -> torch.Tensor:
        """One micro-batch: device augmentation, forward under autocast, scaled backward (DDP all-reduces
        the gradients only when sync_grads, i.e. on the last micro-batch of a step). Returns the loss."""
        x, y = self.augment(images, labels)
        no_sync = self.ddp.no_sync() if self.ddp is not None and not sync_grads else contextlib.nullcontext()
        with no_sync:
            with self.precision.autocast():
                loss = self.loss_fn(self.train_model(x), y)
            if self.step == self.cfg["training.debug_nan_at_step"]:
                loss = loss * float("nan")
            self.scaler.scale(loss / self.accum).backward()
        return loss.detach()

    def optimizer_step(self):
        """After the last micro-batch of a step: clip if configured, step through the GradScaler, EMA."""
        if self.cfg["optim.clip_grad"] > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["optim.clip_grad"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)

    def train_epoch(self) -> dict:
        cfg = self.cfg
        self.train_model.train()
        self.set_epoch_lr()
        self.train_loader.traversal_order.skip_batches = self.epoch_steps_done * self.accum
        self.train_loader.next_epoch = self.epoch
        it = loaders.epoch(self.train_loader, self.compute_threads)
        nonfinite = torch.zeros((), device=self.device, dtype=torch.bool)
        if self.epoch_steps_done == 0:  # (a resumed epoch brings the sum of its first steps)
            self.epoch_loss = torch.zeros((), device=self.device)
        window_loss = torch.zeros((), device=self.device)
        window_t0, window_wait, window_steps = time.perf_counter(), 0.0, 0
        epoch_t0 = time.perf_counter()
        resolution = None
        while self.epoch_steps_done < self.steps_per_epoch:
            for k in range(self.accum):  # micro-batches: the device batches of this process's virtual ranks
                t0 = time.perf_counter()
                images, labels = next(it)
                window_wait += time.perf_counter() - t0
                resolution = images.shape[-1]
                loss = self.forward_backward(images, labels, sync_grads=k == self.accum - 1)
                nonfinite |= ~torch.isfinite(loss)
                window_loss += loss / self.accum
                self.epoch_loss += loss / self.accum
            self.optimizer_step()
            self.step += 1
            self.epoch_steps_done += 1
            window_steps += 1
            if cfg["lr.step_unit"] == "update":
                self.scheduler.step_update(num_updates=self.step)
            if self.step % cfg["logging.log_every"] == 0 or self.epoch_steps_done == self.steps_per_epoch:
                self.check_loss(nonfinite)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - window_t0
                loss_avg = self.d.all_sum([window_loss.item()])[0] / (self.d.world * window_steps)
                images_per_s = window_steps * self.micro_batch * self.accum * self.d.world / elapsed
                metrics = {"train/loss": loss_avg, "train/lr": self.optimizer.param_groups[0]["lr"],
                           "train/images_per_s": images_per_s, "train/data_wait": window_wait / elapsed,
                           "epoch": self.epoch}
                if self.device.type == "cuda":
                    metrics["train/gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                self.tracker.log(metrics, step=self.step)
                self.log(f"epoch {self.epoch} step {self.step} loss {loss_avg:.4f} lr {metrics['train/lr']:.3g} "
                         f"{images_per_s:.0f} img/s data-wait {100 * metrics['train/data_wait']:.0f}%")
                window_loss.zero_()
                window_t0, window_wait, window_steps = time.perf_counter(), 0.0, 0
            if self.agree_to_stop():
                break
        it.close()
        loss_total = self.d.all_sum([self.epoch_loss.item()])[0]
        return {"train/epoch_loss": loss_total / max(1, self.epoch_steps_done * self.d.world),
                "epoch_time_s": time.perf_counter() - epoch_t0, "train/resolution": resolution,
                "order_digest": self.train_loader.traversal_order.digest}

    def agree_to_stop(self) -> bool:
        """After each optimizer step, what all ranks agree on at this step: stop (a signal reached a rank), or
        checkpoint mid-epoch (a rank's clock says training.checkpoint_every_min has passed). True: stop."""
        if (self.d.rank, self.step) in self.debug_signals:
            os.kill(os.getpid(), self.debug_signals[self.d.rank, self.step])
        due = 0 < self.checkpoint_every_s <= time.monotonic() - self.last_save
        stop, save = self.agreement.poll(self.stop_requested, due)
        self.stopping = stop
        if save and not stop and self.epoch_steps_done < self.steps_per_epoch:  # (the epoch's end saves anyway)
            self.save(None, log_artifact=False, end_of_epoch=False)
            self.log(f"checkpoint at step {self.step} (training.checkpoint_every_min="
                     f"{self.cfg['training.checkpoint_every_min']:g}): {self.run_dir / 'last.pt'}")
        return stop

    def reduce_batchnorm(self):
        """Make the BatchNorm running statistics of every rank equal (timm's --dist-bn, with its
        distribute_bn): before validating and before saving, so that every rank evaluates, and the
        checkpoint holds, one model."""
        mode = self.cfg["training.dist_bn"]
        if self.d.world == 1 or mode == "none":
            return
        from timm.utils import distribute_bn
        for model in [self.model] + ([self.ema.module] if self.ema is not None else []):
            distribute_bn(model, self.d.world, reduce=mode == "reduce")

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        model.eval()
        k = min(5, len(self.classes))
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, top-1, top-k, images
        for images, labels in loaders.epoch(self.val_loader, self.compute_threads):
            with self.precision.autocast():
                logits = model(self.augment.normalize(images))  # the same normalisation as training
            logits = logits.float()
            top = logits.topk(k, dim=1).indices
            totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                                   (top[:, 0] == labels).sum().double(),
                                   (top == labels[:, None]).any(dim=1).sum().double(),
                                   torch.tensor(float(labels.numel()), dtype=torch.float64, device=self.device)])
        loss, c1, ck, n = self.d.all_sum(totals.tolist())
        return {"top1": 100 * c1 / n, f"top{k}": 100 * ck / n, "loss": loss / n, "images": int(n)}

    def fit(self) -> float:
        cfg = self.cfg
        self.log(f"{self.d.world} process(es) on {self.device}, precision {self.precision.name}, per-device batch "
                 f"{self.micro_batch} x {self.accum} accumulation, {self.steps_per_epoch} steps/epoch, "
                 f"{self.total_epochs} epochs")
        top1 = None
        try:
            while self.epoch < self.total_epochs:
                res = progressive_resolution(self.epoch, cfg["resolution.progressive_start"],
                                             cfg["resolution.progressive_end"],
                                             cfg["resolution.progressive_start_epoch"],
                                             cfg["resolution.progressive_end_epoch"], cfg["resolution.train"])
                set_train_resolution(self.decoder, res)
                stats = self.train_epoch()
                if self.stopping:  # BatchNorm statistics as they are: rank 0's go on (DDP broadcasts them)
                    self.save(None, log_artifact=False, end_of_epoch=False)
                    break
                self.reduce_batchnorm()
                last = self.epoch + 1 == self.total_epochs
                metrics = {**stats, "epoch": self.epoch}
                top1 = None
                if (self.epoch + 1) % cfg["training.eval_every"] == 0 or last:
                    val = self.evaluate(self.model)
                    top1 = val["top1"]
                    metrics.update({f"val/{k}": v for k, v in val.items()})
                    if self.ema is not None:
                        metrics.update({f"val_ema/{k}": v for k, v in self.evaluate(self.ema.module).items()})
                self.log(f"epoch {self.epoch} done in {stats['epoch_time_s']:.1f}s: train loss "
                         f"{stats['train/epoch_loss']:.4f}" + (f", val top-1 {top1:.2f}" if top1 is not None else ""))
                self.epoch += 1
                self.epoch_steps_done = 0
                self.tracker.log(metrics, step=self.step)  # before the save: a resumed run logs only what follows
                artifact_every = cfg["logging.artifact_every"]
                self.save(top1, log_artifact=last or (artifact_every > 0 and self.epoch % artifact_every == 0))
        finally:
            self.agreement.close()
        self.report()
        if self.stopping:
            self.log(f"stopped by signal at step {self.step}; checkpoint saved to {self.run_dir / 'last.pt'} "
                     f"(resume with --training.resume=auto)")
            return None
        if top1 is not None:
            self.tracker.summary(final_val_top1=top1, best_val_top1=self.best_top1)
            self.log(f"final val top-1: {top1:.2f}")
        return top1

    def report(self):
        """curves.png beside metrics.jsonl, and where everything is (rank 0)."""
        if not self.d.is_main:
            return
        curves = plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
        checkpoints = [str(p) for p in (self.run_dir / "last.pt", self.run_dir / "best.pt") if p.exists()]
        self.log(f"run directory: {self.run_dir} (config.yaml, metrics.jsonl{', curves.png' if curves else ''})")
        self.log(f"checkpoints: {', '.join(checkpoints) or 'none yet'}")
        offline = self.tracker.offline_dir
        if offline is not None:
            self.log(f"W&B offline run: {offline}; upload it with: wandb sync {offline}")


def _buffers(model: torch.nn.Module) -> dict:
    return {name: b.detach().cpu().clone() for name, b in model.named_buffers()}


def _load_buffers(model: torch.nn.Module, saved: dict | None) -> None:
    if saved:
        for name, b in model.named_buffers():
            b.copy_(saved[name])


DEBUG_SIGNALS = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL}


def parse_debug_signals(spec: str) -> dict[tuple[int, int], int]:
    """training.debug_signal_at 'RANK:STEP[:TERM|KILL],...' → {(rank, step): signal}."""
    out = {}
    for item in (i.strip() for i in spec.split(",") if i.strip()):
        rank, step, name = (item.split(":") + ["TERM"])[:3] if item.count(":") in (1, 2) else ("", "", "")
        if not (rank.isdigit() and step.isdigit() and name in DEBUG_SIGNALS):
            raise ConfigError(f"training.debug_signal_at '{spec}': expected RANK:STEP[:TERM|KILL][,...]")
        out[int(rank), int(step)] = DEBUG_SIGNALS[name]
    return out


def train(argv=None) -> int:
    cfg = load_config(train_config.SECTIONS, argv, prog="python -m rsb_ffcv.train", description=__doc__)
    d = distributed.init(cfg["training.device"])
    if d.is_main:
        print("config:")
        print_config(cfg)
    trainer = Trainer(cfg, d)

    def request_stop(signum, frame):
        if trainer.stop_requested and signum == signal.SIGINT:  # Ctrl-C twice: stop now
            raise KeyboardInterrupt
        if trainer.stop_requested:  # Slurm signals every process of a step, and torchrun passes it on again
            return
        trainer.stop_requested = True
        print(f"signal {signum} on rank {d.rank}: the ranks finish the current step together, then save",
              flush=True)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        trainer.fit()
    except BaseException:
        trainer.tracker.finish(1)
        raise
    trainer.tracker.finish(0)
    return 0


def main(argv=None) -> int:
    return cli.run(train, argv, cleanup=distributed.shutdown)


if __name__ == "__main__":
    sys.exit(main())
