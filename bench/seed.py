"""Pre-seed a data dir's database with fake devices, fast, to measure claims against a big fleet.

    python -m bench.seed DATA_DIR --devices 1000000

Rows go straight into the `devices` table with executemany in large transactions (synchronous=OFF:
a crash while seeding only loses benchmark data). They look like real rows where the bridge reads
them: random 128-bit `dev_` ids, `seed-########` hardware ids in the first tenant, the first key,
and a random 65-byte public key (never used for ECDH: no claim names a seeded hardware id). Run it
while the bridge is stopped. The table's columns are checked first, so a schema change fails here
with a clear message instead of seeding rows the bridge cannot read.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from provwire.errors import ProvbridgeError

DEVICE_COLUMNS = (
    "id",
    "tenant_id",
    "hardware_id",
    "name",
    "public_key",
    "cloud_key_id",
    "api_key_hash",
    "labels",
    "groups_",
    "profile",
    "hardware",
    "network",
    "agent_version",
    "key_id",
    "status",
    "created_at",
    "updated_at",
    "credential_type",
    "credential_generation",
    "refused_until",
    "reset_pending",
)


class SeedError(ProvbridgeError):
    """The seed's arguments or target cannot work; the message is the one line to show."""


def _rows(
    count: int, tenant_id: str, key_id: str, cloud_kid: str, prefix: str, start: int
) -> Iterator[tuple[Any, ...]]:
    now = int(time.time())
    hardware = json.dumps({"board_model": "provbridge-seed", "cpu_cores": 1})
    for i in range(start, start + count):
        rnd = os.urandom(16 + 64)
        yield (
            "dev_" + base64.b32encode(rnd[:16]).decode("ascii").rstrip("=").lower(),
            tenant_id,
            f"{prefix}-{i:08d}",
            None,
            b"\x04" + rnd[16:],
            cloud_kid,
            hashlib.sha256(rnd).digest(),
            "{}",
            "[]",
            "default",
            hardware,
            None,
            "provbridge-seed/1",
            key_id,
            "active",
            now,
            now,
            "token",
            0,
            None,
            0,
        )


def seed_devices(
    data_dir: Path, count: int, tenant: str = "default", prefix: str = "seed", batch: int = 50_000
) -> dict[str, float | int]:
    """Insert `count` devices; returns how many rows the table then has and how long it took."""
    db_path = data_dir / "provbridge.db"
    if not db_path.is_file():
        raise SeedError(f"{db_path} does not exist: initialise the data dir first (provbridge init)")
    active = json.loads((data_dir / "keys" / "active.json").read_text())
    t0 = time.monotonic()
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=30.0)
    try:
        columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(devices)"))
        if columns != DEVICE_COLUMNS:
            raise SeedError(f"devices table has columns {columns}, bench/seed.py knows {DEVICE_COLUMNS}: update it")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        row = conn.execute("SELECT id FROM tenants WHERE name = ?", (tenant,)).fetchone()
        if row is None:
            raise SeedError(f"no tenant {tenant!r} in {db_path}")
        tenant_id = row[0]
        key = conn.execute(
            "SELECT id FROM provision_keys WHERE tenant_id = ? ORDER BY created_at LIMIT 1", (tenant_id,)
        )
        key_row = key.fetchone()
        if key_row is None:
            raise SeedError(f"tenant {tenant!r} has no provisioning key")
        start = int(
            conn.execute("SELECT COUNT(*) FROM devices WHERE hardware_id LIKE ?", (prefix + "-%",)).fetchone()[0]
        )
        placeholders = ",".join("?" * len(DEVICE_COLUMNS))
        sql = f"INSERT INTO devices ({','.join(DEVICE_COLUMNS)}) VALUES ({placeholders})"
        done = 0
        while done < count:
            n = min(batch, count - done)
            conn.execute("BEGIN")
            conn.executemany(sql, _rows(n, tenant_id, key_row[0], active["cloud"], prefix, start + done))
            conn.execute("COMMIT")
            done += n
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        total = int(conn.execute("SELECT COUNT(*) FROM devices").fetchone()[0])
    finally:
        conn.close()
    return {
        "seeded": count,
        "devices_total": total,
        "seconds": round(time.monotonic() - t0, 2),
        "db_bytes": db_path.stat().st_size,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.seed", description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", type=Path)
    p.add_argument("--devices", type=int, required=True, help="how many fake devices to add")
    p.add_argument("--tenant", default="default")
    p.add_argument("--prefix", default="seed", help="hardware ids are PREFIX-########")
    args = p.parse_args(argv)
    try:
        result = seed_devices(args.data_dir, args.devices, args.tenant, args.prefix)
    except (SeedError, OSError, sqlite3.Error) as exc:
        print(f"seed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
