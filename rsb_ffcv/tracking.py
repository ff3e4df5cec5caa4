"""Metrics to W&B and to a local metrics.jsonl (`Tracker`, rank 0 only; `read_metrics` reads it back for every
tool); checkpoints as W&B model artifacts; the training step metrics (`StepMeter`); the per-epoch curves.

W&B never costs a run. wandb_mode=auto is online when credentials are configured (WANDB_API_KEY or a
netrc entry) and the server answers a quick probe, else offline, saying so in one line with the
`wandb sync` command for later. wandb_mode=online that cannot reach the server stops before any training
with one error line. Compute nodes often have credentials but no route out: the probe takes at most
PROBE_TIMEOUT_S, where wandb.init would retry for minutes.
"""
from __future__ import annotations

import contextlib
import functools
import json
import netrc
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import torch

from .cli import first_line
from .config import ConfigError
from .files import atomic_path

PROBE_TIMEOUT_S = 5.0
INIT_TIMEOUT_S = 60.0


def wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(urlparse(wandb_base_url()).hostname or "api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_unreachable() -> str | None:
    """None when the W&B server answers (any HTTP status), else why not (refused, timeout, no DNS)."""
    return _probe(wandb_base_url(), PROBE_TIMEOUT_S)


@functools.lru_cache(maxsize=None)
def _probe(url: str, timeout: float) -> str | None:  # once per server and process
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return str(reason) or type(reason).__name__
    return None


def offline_note(key: str, what: str) -> str:
    """The one line of wandb_mode=auto going offline; `what` the server did ("cannot be reached (...)")."""
    return (f"W&B: {wandb_base_url()} {what}; logging offline instead ({key}=auto). Upload later from a machine "
            f"with network: wandb sync <run_dir>/wandb/offline-run-*")


def online_error(key: str, why: str) -> ConfigError:
    return ConfigError(f"{key}=online but the W&B server {wandb_base_url()} cannot be reached ({why}): set "
                       f"{key}=offline (upload later with wandb sync) or disabled")


def resolve_wandb_mode(mode: str, key: str = "logging.wandb_mode") -> str:
    """The mode to run W&B in; ConfigError (one line) when online is asked for and impossible."""
    if mode == "auto" and not wandb_credentials_present():
        return "offline"
    if mode in ("auto", "online"):
        why = wandb_unreachable()
        if why is None:
            return "online"
        if mode == "online":
            raise online_error(key, why)
        print(offline_note(key, f"cannot be reached ({why})"), flush=True)
        return "offline"
    return mode


def read_metrics(path: Path) -> tuple[list[dict], str | None]:
    """The whole lines of metrics.jsonl, and a note when the file ends in a partial line (a run killed mid-write)."""
    rows, note = [], None
    lines = path.read_text().split("\n") if path.exists() else []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                note = "metrics.jsonl ends in a partial line (a run stopped mid-write): read up to the last whole line"
            else:
                raise ConfigError(f"'{path}' line {i + 1} is not JSON: a damaged metrics file") from None
    return rows, note


def keep_records_until(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl (atomically) without the records logged after `step`, which a resumed run logs
    again (a run killed after its last checkpoint got further than it), and without a line cut short by a kill."""
    if not path.exists():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        with atomic_path(path) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in kept))


class Tracker:
    def __init__(self, run_dir: Path, config: dict, *, mode: str, project: str, entity: str, name: str,
                 run_id: str | None = None, enabled: bool = True, key: str = "logging.wandb_mode",
                 from_step: int = 0):
        """`key`: the option that set `mode` (for messages). `run_id`: continue that W&B run (a resumed or
        requeued run). `from_step`: the step the run starts from; metrics.jsonl keeps only what came before."""
        self.enabled = enabled
        self.run = None
        self.run_dir = run_dir
        self.mode = "disabled"
        self.offline_dir: Path | None = None  # the offline run's directory (for `wandb sync`)
        self.run_id: str | None = None
        if not enabled:
            return
        self.mode = resolve_wandb_mode(mode, key)
        keep_records_until(run_dir / "metrics.jsonl", from_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if self.mode != "disabled":
            import wandb
            kwargs = dict(dir=str(run_dir), project=project, entity=entity or None, name=name, id=run_id,
                          resume="allow" if run_id else None, config=config)
            try:
                self.run = wandb.init(mode=self.mode, settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S), **kwargs)
            except Exception as e:  # the server answered the probe but refused the run (key, entity, quota)
                if self.mode == "offline" or mode == "online":
                    self.jsonl.close()
                    raise ConfigError(f"W&B could not start a run ({type(e).__name__}: {first_line(e)}): set "
                                      f"{key}=offline or disabled") from None
                print(offline_note(key, f"refused the run ({type(e).__name__}: {first_line(e)})"), flush=True)
                self.mode = "offline"
                self.run = wandb.init(mode="offline", **kwargs)
        self.offline_dir = Path(self.run.dir).parent if self.run is not None and self.mode == "offline" else None
        self.run_id = self.run.id if self.run is not None else None

    def _wandb(self, what: str, call):
        """A W&B call that cannot cost the run: if W&B's service has gone (Slurm's SIGTERM reaches every process of
        a job step, W&B's too), say so once and go on without W&B. metrics.jsonl keeps everything, and a resumed
        run continues the same W&B run."""
        if self.run is None:
            return None
        try:
            return call()
        except Exception as e:
            self.run = None
            import wandb
            with contextlib.suppress(Exception):  # forget the dead service (a later run in this process starts anew)
                wandb.teardown()
            print(f"W&B stopped working ({what}: {type(e).__name__}: {first_line(e)}); training goes on, logging to "
                  f"metrics.jsonl only; a resumed run continues the W&B run", flush=True)
            return None

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self.jsonl.flush()
        self._wandb("log", lambda: self.run.log(metrics, step=step))

    def log_checkpoint(self, path: Path, aliases: list[str], metadata: dict) -> None:
        if not self.enabled or self.run is None:
            return
        import wandb
        artifact = wandb.Artifact(f"model-{self.run.id}", type="model", metadata=metadata)
        artifact.add_file(str(path), name="checkpoint.pt")
        self._wandb("log_artifact", lambda: self.run.log_artifact(artifact, aliases=aliases))

    def log_table(self, key: str, rows: list[dict]) -> None:
        """A W&B Table, columns from the rows' keys (missing cells: None); PIL images become wandb.Image."""
        if not self.enabled or self.run is None or not rows:
            return
        import wandb
        from PIL import Image
        columns = list(dict.fromkeys(k for r in rows for k in r))
        data = [[wandb.Image(v) if isinstance(v, Image.Image) else v for v in (r.get(c) for c in columns)]
                for r in rows]
        self._wandb("log", lambda: self.run.log({key: wandb.Table(columns=columns, data=data)}))

    def summary(self, **values) -> None:
        if self.enabled:
            self._wandb("summary", lambda: self.run.summary.update(values))

    def finish(self, exit_code: int = 0) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        self._wandb("finish", lambda: self.run.finish(exit_code=exit_code))


class StepMeter:
    """The training metrics of a logging window (the steps since the last log): mean loss over steps and ranks,
    images/s, the share of the wall time the main thread waited for batches (`batches`), peak GPU memory."""

    def __init__(self, d, images_per_step: int):
        self.d, self.images_per_step = d, images_per_step
        self.resolution = None  # of the last batch taken
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.d.device)  # this rank's sum of step losses (no device sync)
        self.steps, self.wait, self.t0 = 0, 0.0, time.perf_counter()

    def batches(self, it):
        """The batches of `it`, timing the waits for each."""
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                return
            self.wait += time.perf_counter() - t0
            self.resolution = batch[0].shape[-1]
            yield batch

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1

    def read(self, lr: float, epoch: int) -> dict:
        """The window's metrics (one all-reduce: a NaN/inf on any rank makes train/loss non-finite everywhere),
        then a new window."""
        if self.d.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.t0
        loss = self.d.all_sum([self.loss.item()])[0] / (self.d.world * max(1, self.steps))
        metrics = {"train/loss": loss, "train/lr": lr, "train/data_wait": self.wait / elapsed, "epoch": epoch,
                   "train/images_per_s": self.steps * self.images_per_step / elapsed}
        if self.d.device.type == "cuda":
            metrics["train/gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.reset()
        return metrics

    @staticmethod
    def line(metrics: dict, step: int) -> str:
        return (f"epoch {metrics['epoch']} step {step} loss {metrics['train/loss']:.4f} lr {metrics['train/lr']:.3g} "
                f"{metrics['train/images_per_s']:.0f} img/s data-wait {100 * metrics['train/data_wait']:.0f}%")


def epoch_curves(rows: list[dict]) -> dict[str, list[tuple]]:
    """The per-epoch curves of metrics.jsonl rows, as (epoch, value) points: train loss, val top-1 and the first
    learning rate of each epoch."""
    epochs = [r for r in rows if "train/epoch_loss" in r]
    lr_by_epoch = {}
    for r in rows:
        if "train/lr" in r:
            lr_by_epoch.setdefault(r["epoch"], r["train/lr"])
    return {"train loss": [(r["epoch"], r["train/epoch_loss"]) for r in epochs],
            "val top-1 (%)": [(r["epoch"], r["val/top1"]) for r in epochs if "val/top1" in r],
            "learning rate": sorted(lr_by_epoch.items())}


def curves_figure(runs: dict[str, dict[str, list[tuple]]]):
    """One panel per curve of epoch_curves, the runs ({name: curves}) overlaid in one colour each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for i, (name, curves) in enumerate(runs.items()):
        for ax, points in zip(axes, curves.values()):
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, color=f"C{i % 10}", label=name)
    for ax, title in zip(axes, next(iter(runs.values()), {})):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
    if len(runs) > 1:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_curves(metrics_jsonl: Path, out: Path) -> Path | None:
    """Train loss, val top-1 and learning rate per epoch from metrics.jsonl, as one PNG (None: no epoch yet)."""
    curves = epoch_curves(read_metrics(Path(metrics_jsonl))[0])
    if not curves["train loss"]:
        return None
    from .files import save_figure
    return save_figure(curves_figure({"": curves}), out, dpi=100)
