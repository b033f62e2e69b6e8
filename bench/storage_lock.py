"""How long a claim holds the database's one write lock, on SQLite and on PostgreSQL (docs/SCALING.md).

Every write, from every bridge process on every host, takes the same lock (bridge/storage/database.py), so the
lock's hold time per claim bounds the claims per second of the whole fleet, however many bridges share the
database: at most 1 / (hold per claim). This runs the claim worker's own handlers (`claim_handlers`, group commit
by `handle_batch`) in this process on real claims (real crypto) against a fresh SQLite file and a fresh database of
a PostgreSQL server it starts on 127.0.0.1 (tests/helpers/postgres.py), and times each write transaction from the
moment it holds the lock to its COMMIT. No broker: only the database's share of a claim is measured.

    python -m bench.storage_lock [--claims 2000] [--batch 16] [--doc]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bridge.config import Settings, StorageSettings, load_settings
from bridge.edges.core import claim_handlers
from bridge.ops import admin
from bridge.storage.store import Store
from provwire import crypto, topics
from provwire.models import Claim, to_json
from tests.helpers.postgres import PostgresServer, postgres_bindir  # the tests' one PostgreSQL launcher


def _claims(settings: Settings, key: str, count: int) -> list[tuple[str, bytes]]:
    made = []
    for _ in range(count):
        hardware_id = f"hw-{uuid.uuid4().hex[:12]}"
        public_key = crypto.b64encode(crypto.sec1(crypto.generate_private_key().public_key()))
        claim = Claim(request_id=uuid.uuid4().hex, provision_key=key, hardware_id=hardware_id, public_key=public_key)
        made.append((topics.claim_topic(settings.topic_prefix, hardware_id), to_json(claim)))
    return made


def _timed(store: Store, holds: list[float]) -> None:
    writing = store._db.writing

    @contextmanager
    def timed(batch: bool = False) -> Iterator[Any]:
        start = None
        try:
            with writing(batch) as conn:
                start = time.perf_counter()  # the lock is held from here
                yield conn
        finally:  # after COMMIT
            if start is not None:
                holds.append(time.perf_counter() - start)

    store._db.writing = timed  # type: ignore[method-assign]


def measure(engine: str, root: Path, claims: int, batch: int, url: str | None) -> dict[str, Any]:
    settings = load_settings(None).model_copy(update={"data_dir": root / engine, "storage": StorageSettings(url=url)})
    settings = settings.model_copy(update={"claims": settings.claims.model_copy(update={"rate_limits": False})})
    key = admin.init_data_dir(settings).provision_key
    assert key is not None
    store = Store(settings.database)
    handlers = claim_handlers(settings, store, one_thread=True)
    messages = _claims(settings, key, claims)
    handlers.handle_batch(messages[:batch])  # warm: prepared statements, pool, caches
    holds: list[float] = []
    _timed(store, holds)
    start = time.perf_counter()
    for offset in range(batch, claims, batch):
        handlers.handle_batch(messages[offset : offset + batch])
    wall = time.perf_counter() - start
    done = claims - batch
    devices = store.count("devices")
    store.close()
    assert devices == claims, (devices, claims)
    per_claim_ms = sum(holds) / done * 1000
    return {
        "engine": engine,
        "claims": done,
        "batch": batch,
        "transactions": len(holds),
        "hold_per_transaction_ms_p50": round(statistics.median(holds) * 1000, 3),
        "hold_per_transaction_ms_max": round(max(holds) * 1000, 3),
        "hold_per_claim_ms": round(per_claim_ms, 3),
        "fleet_ceiling_claims_per_s": round(1000 / per_claim_ms),
        "one_process_claims_per_s": round(done / wall),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storage_lock", description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16, help="claims per group commit (the claim worker's batch)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if postgres_bindir() is None:
        print("PostgreSQL is not installed (make postgresql)", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="provbridge-bench-") as tmp:
        root = Path(tmp)
        with PostgresServer(root / "postgres") as server:
            for engine, url in (("sqlite", None), ("postgresql", server.create_database())):
                results.append(measure(engine, root, args.claims, args.batch, url))
    for r in results:
        print(
            f"{r['engine']:<11} {r['claims']} claims in batches of {r['batch']}: write lock held"
            f" {r['hold_per_transaction_ms_p50']} ms per transaction (p50; max {r['hold_per_transaction_ms_max']}),"
            f" {r['hold_per_claim_ms']} ms per claim -> at most {r['fleet_ceiling_claims_per_s']} claims/s for"
            f" the fleet; this one process: {r['one_process_claims_per_s']} claims/s"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
