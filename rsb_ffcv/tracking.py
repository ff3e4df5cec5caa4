"""Metrics to W&B and to a local metrics.jsonl; checkpoints as W&B model artifacts. Rank 0 only.

wandb_mode=auto is online when credentials are configured (WANDB_API_KEY or a netrc entry), else
offline: a run never fails for lack of network.
"""
from __future__ import annotations

import json
import netrc
import os
import time
from pathlib import Path


def wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    if mode == "auto":
        return "online" if wandb_credentials_present() else "offline"
    return mode


class Tracker:
    def __init__(self, run_dir: Path, config: dict, *, mode: str, project: str, entity: str, name: str,
                 run_id: str | None = None, enabled: bool = True):
        self.enabled = enabled
        self.run = None
        self.run_dir = run_dir
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        mode = resolve_wandb_mode(mode)
        if mode != "disabled":
            import wandb
            self.run = wandb.init(dir=str(run_dir), mode=mode, project=project, entity=entity or None,
                                  name=name, id=run_id, resume="allow" if run_id else None, config=config)
        self.mode = mode

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self.jsonl.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_checkpoint(self, path: Path, aliases: list[str], metadata: dict) -> None:
        if not self.enabled or self.run is None:
            return
        import wandb
        artifact = wandb.Artifact(f"model-{self.run.id}", type="model", metadata=metadata)
        artifact.add_file(str(path), name="checkpoint.pt")
        self.run.log_artifact(artifact, aliases=aliases)

    def log_table(self, key: str, rows: list[dict]) -> None:
        """A W&B Table, columns from the rows' keys (missing cells: None); PIL images become wandb.Image."""
        if not self.enabled or self.run is None or not rows:
            return
        import wandb
        from PIL import Image
        columns = list(dict.fromkeys(k for r in rows for k in r))
        data = [[wandb.Image(v) if isinstance(v, Image.Image) else v for v in (r.get(c) for c in columns)]
                for r in rows]
        self.run.log({key: wandb.Table(columns=columns, data=data)})

    def summary(self, **values) -> None:
        if self.enabled and self.run is not None:
            self.run.summary.update(values)

    def finish(self, exit_code: int = 0) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
