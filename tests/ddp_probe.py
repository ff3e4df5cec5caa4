"""Run under torchrun by tests/test_distributed.py: a Trainer with gradient accumulation inside DDP, counting the
micro-batches that run under DDP's no_sync. Writes OUT/rank<r>.json.

usage: torchrun --nproc_per_node=2 tests/ddp_probe.py OUT TRAINER_ARGS...
"""
import contextlib
import json
import sys
from pathlib import Path

import torch

from rsb_ffcv import distributed, train, train_config
from rsb_ffcv.config import load_config


def main():
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    cfg = load_config(train_config.SECTIONS, argv)
    d = distributed.init("cpu")
    t = train.Trainer(cfg, d)
    counts = {"no_sync": 0, "forward": 0}
    no_sync = t.recipe.ddp.no_sync

    @contextlib.contextmanager
    def counted():
        counts["no_sync"] += 1
        with no_sync():
            yield
    t.recipe.ddp.no_sync = counted
    t.recipe.ddp.register_forward_pre_hook(lambda *a: counts.__setitem__("forward", counts["forward"] + 1))
    t.train_epoch()
    checksum = float(sum(p.double().sum() for p in t.recipe.model.parameters()))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{d.rank}.json").write_text(json.dumps({**counts, "accum": t.data.accum, "steps": t.progress.step,
                                                        "checksum": checksum}))
    t.tracker.finish(0)
    distributed.shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
