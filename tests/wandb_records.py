"""Read an offline `.wandb` file (wandb 0.31 has no public reader).

Layout: a 7-byte header (`:W&B`, a 2-byte magic, a version byte), then LevelDB-log framing in
32 KiB blocks: each chunk is crc32c (4) | length (2, little-endian) | type (1: full, 2: first,
3: middle, 4: last) | payload. Payloads joined across chunks are `wandb_internal_pb2.Record`s."""
from __future__ import annotations

import json
import struct
from typing import Any

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: str) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a wandb datastore file"
    records, pending, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # trailer padding
            pos += left_in_block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += payload
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def logged_rows(path: str) -> list[dict[str, Any]]:
    """The `history` rows: one dict per `run.log` call, values JSON-decoded."""
    rows = []
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
    return rows


def logged_config(path: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    for rec in read_records(path):
        kind = rec.WhichOneof("record_type")
        updates = rec.config.update if kind == "config" else rec.run.config.update if kind == "run" else []
        for item in updates:
            cfg[item.key] = json.loads(item.value_json)
    return cfg
