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
import sys
import time
from pathlib import Path

import torch
import yaml

from . import checkpoint, cli, distributed, loaders, stops, train_config
from .config import ConfigError, load_config, nest, print_config
from .evaluate import predict
from .files import load_json, save_json
from .recipe import build_recipe
from .tracking import StepMeter, Tracker, plot_curves, resolve_wandb_mode


class Trainer:
    """One process of a run. Built from the config: its data (`loaders.build_data`), the recipe (`recipe`), the
    checkpoints (`checkpoint`), when to stop or save (`stops`), the tracker. `fit` then runs the epochs: train,
    equal BatchNorm statistics, validate, log, save."""

    def __init__(self, cfg: dict, d: distributed.Dist):
        self.cfg, self.d = cfg, d
        self.log = functools.partial(print, flush=True) if d.is_main else (lambda *a, **k: None)
        self.run_dir = Path(cfg["logging.run_dir"])
        resume = checkpoint.resolve_resume(cfg["training.resume"], self.run_dir)
        if resume is None and (self.run_dir / "last.pt").exists():
            raise ConfigError(f"logging.run_dir '{self.run_dir}' already holds a checkpoint: set "
                              f"training.resume=auto to continue it, or choose another run_dir")
        if d.is_main and cfg["logging.wandb_mode"] == "online":  # unreachable: stop before building anything
            resolve_wandb_mode("online", "logging.wandb_mode")
        self.stops = stops.StopControl(d.rank, d.world, cfg["training.checkpoint_every_min"], resume is not None,
                                       d.timeout)
        self.data = loaders.build_data(cfg, d)
        self.progress = checkpoint.Progress()
        nan_at = None if resume else stops.hook_step(stops.NAN_HOOK)  # test hooks fire in a fresh run only
        hook = None if nan_at is None else (lambda fn: stops.poison_loss(fn, nan_at, lambda: self.progress.step))
        self.recipe = build_recipe(cfg, d, len(self.data.classes), self.data.steps_per_epoch, self.data.accum, hook)
        self.checkpoints = checkpoint.Checkpoints(self.run_dir, d, cfg, self.data.classes,
                                                  tear_at=None if resume else stops.hook_step(stops.TEAR_HOOK))
        if d.is_main:  # (after Checkpoints removed what killed writes left)
            checkpoint.check_free_space(self.run_dir, self.recipe.checkpoint_bytes())
        self.epoch_loss = torch.zeros((), device=d.device)  # this rank's sum of step losses in this epoch
        wandb_id = None
        if resume is not None:
            wandb_id = self.checkpoints.resume(resume, self.recipe, self.progress, self.epoch_loss, self.log)
        elif cfg["training.resume"] == "auto":  # requeued before its first checkpoint: the same W&B run again
            wandb_id = load_json(self.run_dir / "run.json", {}).get("wandb_run_id")
        self.tracker = self.start_tracker(wandb_id)

    def start_tracker(self, wandb_id: str | None) -> Tracker:
        """config.yaml, the tracker (W&B + metrics.jsonl) and run.json (how it ran: for python -m rsb_ffcv.report)."""
        cfg, d, data = self.cfg, self.d, self.data
        if d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(nest(cfg), sort_keys=True))
        tracker = Tracker(self.run_dir, cfg, mode=cfg["logging.wandb_mode"], project=cfg["logging.wandb_project"],
                          entity=cfg["logging.wandb_entity"], name=cfg["logging.run_name"] or self.run_dir.name,
                          run_id=wandb_id, enabled=d.is_main, key="logging.wandb_mode", from_step=self.progress.step)
        if d.is_main:
            device = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "CPU"
            save_json(self.run_dir / "run.json", {
                "world": d.world, "nodes": d.world // d.local_world, "device": device, "accum": data.accum,
                "device_batch": data.micro_batch, "precision": self.recipe.precision.name,
                "data_order": data.data_order, "wandb_run_id": tracker.run_id})
        return tracker

    def fit(self) -> float | None:
        """Train to the last epoch; the final val top-1, or None when the ranks stopped on a signal (last.pt
        holds the step they stopped at). Several processes call it inside `stops.running()`, which ends the
        stop agreement."""
        p, data = self.progress, self.data
        self.log(f"{self.d.world} process(es) on {self.d.device}, precision {self.recipe.precision.name}, "
                 f"per-device batch {data.micro_batch} x {data.accum} accumulation, {data.steps_per_epoch} "
                 f"steps/epoch, {self.recipe.total_epochs} epochs")
        top1, stopped = None, False
        while p.epoch < self.recipe.total_epochs and not stopped:
            stats = self.train_epoch()
            stopped = stats is None
            if stopped:  # BatchNorm statistics as they are: rank 0's go on (DDP broadcasts them)
                self.save(end_of_epoch=False)
            else:
                top1 = self.end_epoch(stats)
        if self.d.is_main:
            report(self.run_dir, self.tracker, self.log)
        if stopped:
            self.log(f"stopped by signal at step {p.step}; checkpoint saved to {self.run_dir / 'last.pt'} "
                     f"(resume with --training.resume=auto)")
            return None
        if top1 is not None:
            self.tracker.summary(final_val_top1=top1, best_val_top1=p.best_top1)
            self.log(f"final val top-1: {top1:.2f}")
        return top1

    def train_epoch(self) -> dict | None:
        """The epoch's steps from progress.epoch_steps_done on; None when the ranks agreed to stop in it."""
        p, r, data = self.progress, self.recipe, self.data
        r.train_model.train()
        r.set_lr(p.epoch, p.step)
        if p.epoch_steps_done == 0:  # (a resumed epoch brings the sum of its first steps)
            self.epoch_loss.zero_()
        meter, t0 = StepMeter(self.d, data.micro_batch * data.accum * self.d.world), time.perf_counter()
        with contextlib.closing(data.train.epoch(p.epoch, skip_batches=p.epoch_steps_done * data.accum)) as it:
            batches = meter.batches(it)
            while p.epoch_steps_done < data.steps_per_epoch:
                loss = r.train_step(batches, p.step)
                p.step, p.epoch_steps_done = p.step + 1, p.epoch_steps_done + 1
                self.epoch_loss += loss
                meter.add(loss)
                if p.step % self.cfg["logging.log_every"] == 0 or p.epoch_steps_done == data.steps_per_epoch:
                    self.log_steps(meter)
                stop, save = self.stops.poll(p.step)
                if stop:
                    return None
                if save and p.epoch_steps_done < data.steps_per_epoch:  # (the epoch's end saves anyway)
                    self.save(end_of_epoch=False)
                    self.log(f"checkpoint at step {p.step} (training.checkpoint_every_min="
                             f"{self.cfg['training.checkpoint_every_min']:g}): {self.run_dir / 'last.pt'}")
        total = self.d.all_sum([self.epoch_loss.item()])[0]
        return {"train/epoch_loss": total / (p.epoch_steps_done * self.d.world), "epoch_time_s":
                time.perf_counter() - t0, "train/resolution": meter.resolution, "order_digest": data.train.order.digest}

    def log_steps(self, meter: StepMeter) -> None:
        """The logging window's metrics; a loss that is not finite on any rank ends the run (before any save)."""
        metrics = meter.read(self.recipe.optimizer.param_groups[0]["lr"], self.progress.epoch)
        if not math.isfinite(metrics["train/loss"]):
            raise self.checkpoints.not_finite(self.progress)
        self.tracker.log(metrics, step=self.progress.step)
        self.log(StepMeter.line(metrics, self.progress.step))

    def end_epoch(self, stats: dict) -> float | None:
        """Equal BatchNorm statistics on all ranks, validation when due, the epoch's metrics, the checkpoint."""
        p, r, cfg = self.progress, self.recipe, self.cfg
        r.reduce_batchnorm(self.d.world, cfg["training.dist_bn"])
        last = p.epoch + 1 == r.total_epochs
        metrics, top1 = {**stats, "epoch": p.epoch}, None
        if (p.epoch + 1) % cfg["training.eval_every"] == 0 or last:
            val = self.validate(r.model)
            top1 = val["top1"]
            metrics.update({f"val/{k}": v for k, v in val.items()})
            if r.ema is not None:
                metrics.update({f"val_ema/{k}": v for k, v in self.validate(r.ema.module).items()})
        self.log(f"epoch {p.epoch} done in {stats['epoch_time_s']:.1f}s: train loss {stats['train/epoch_loss']:.4f}"
                 + (f", val top-1 {top1:.2f}" if top1 is not None else ""))
        p.epoch, p.epoch_steps_done = p.epoch + 1, 0
        self.tracker.log(metrics, step=p.step)  # before the save: a resumed run logs only what follows
        every = cfg["logging.artifact_every"]
        self.save(top1, artifact=last or (every > 0 and p.epoch % every == 0))
        return top1

    def validate(self, model: torch.nn.Module) -> dict:
        """top1, top5 (top-k for k = min(5, classes)), loss and images of `model` on the val beton, all ranks."""
        k = min(5, len(self.data.classes))
        top, labels, loss = predict(model, self.data.val, self.d.device, self.recipe.precision, k,
                                    self.data.train.compute_threads)
        n, c1, ck, loss = self.d.all_sum([len(labels), float((top[:, 0] == labels).sum()),
                                          float((top == labels[:, None]).any(1).sum()), loss])
        return {"top1": 100 * c1 / n, "top5": 100 * ck / n, "loss": loss / n, "images": int(n)}

    def save(self, top1: float | None = None, artifact: bool = False, end_of_epoch: bool = True) -> None:
        self.checkpoints.save(self.recipe, self.progress, self.epoch_loss, self.tracker, top1, artifact, end_of_epoch)
        self.stops.saved()


def report(run_dir: Path, tracker: Tracker, log) -> None:
    """curves.png beside metrics.jsonl, and where everything is."""
    curves = plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    found = [str(p) for p in (run_dir / "last.pt", run_dir / "best.pt") if p.exists()]
    log(f"run directory: {run_dir} (config.yaml, metrics.jsonl{', curves.png' if curves else ''})")
    log(f"checkpoints: {', '.join(found) or 'none yet'}")
    if tracker.offline_dir is not None:
        log(f"W&B offline run: {tracker.offline_dir}; upload it with: wandb sync {tracker.offline_dir}")


def train(argv=None) -> int:
    cfg = load_config(train_config.SECTIONS, argv, prog="python -m rsb_ffcv.train", description=__doc__)
    d = distributed.init(cfg["training.device"], timeout_min=cfg["training.dist_timeout_min"])
    if d.is_main:
        print("config:")
        print_config(cfg)
    trainer = Trainer(cfg, d)
    try:
        with trainer.stops.running():  # SIGTERM/SIGINT: all ranks stop at one step and save; restored after
            trainer.fit()
    except BaseException as e:
        failure = distributed.explain_lost_rank(d, e)  # (first: the other ranks wait for its check only so long)
        trainer.tracker.finish(1)
        if failure is e:
            raise
        raise failure from e
    trainer.tracker.finish(0)
    return 0


def main(argv=None) -> int:
    return cli.run(train, argv, cleanup=distributed.shutdown)


if __name__ == "__main__":
    sys.exit(main())
