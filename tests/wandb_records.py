"""Read the records of an offline W&B run file (`run-ID.wandb`).

Current wandb has no Python reader for it. The file is a LevelDB-style log: a 7-byte header
(":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks, each with a 7-byte header
(crc32, length, type FULL/FIRST/MIDDLE/LAST); the joined payloads are protobuf `Record`s.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list:
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B run file"
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding (end of a partly written block)
            pos += left_in_block
            continue
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            pending = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind == MIDDLE:
            pending += payload
            continue
        elif kind == LAST:
            pending += payload
        rec = pb.Record()
        rec.ParseFromString(pending)
        out.append(rec)
        pending = b""
    return out


def run_file(run_dir: str | Path) -> Path:
    found = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert found, f"no offline W&B run under {run_dir}"
    return found[-1]


def config(recs) -> dict:
    """The run's config: sent with the run record, updated by config records."""
    out = {}
    for r in recs:
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            for item in (r.run.config if kind == "run" else r.config).update:
                if item.key != "_wandb":
                    out[item.key] = json.loads(item.value_json)
    return out


def history(recs) -> list[dict]:
    rows = []
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


def artifacts(recs) -> list:
    """ArtifactRecords, whether sent as records or inside log_artifact requests."""
    out = []
    for r in recs:
        kind = r.WhichOneof("record_type")
        if kind == "artifact":
            out.append(r.artifact)
        elif kind == "request" and r.request.WhichOneof("request_type") == "log_artifact":
            out.append(r.request.log_artifact.artifact)
    return out
