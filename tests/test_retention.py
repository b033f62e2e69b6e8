"""Event retention: the periodic purge deletes events older than `claims.event_retention_days` from a
real SQLite file, keeps the rest (all of them with 0), and deletes in batches that let claims in."""

import threading

import pytest

from bridge.config import Settings, load_settings
from bridge.edges.core import claim_handlers
from bridge.storage.store import Store
from provwire.models import Event, rfc3339
from tests.helpers.storage import on_postgres, postgres_plan, sorts_or_scans
from tests.helpers.waiting import wait_for

# Storage-dependent: each test runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends

DAY = 86_400
NOW = 1_900_000_000  # a fixed "now": the purge takes it as an argument


def add_event(store: Store, at: float, name: str) -> None:
    store.add_events([Event(event=name, time=rfc3339(at), tenant="_")])


# What `init` stored (its tenant and first key were made): recent, so no purge here touches them.
INIT_EVENTS = ("tenant.created", "key.created")


def event_names(store: Store) -> set[str]:
    """The names of the events stored, those of `init` left out."""
    names = {str(r[0]) for r in store.connection().execute("SELECT event FROM events")}
    return names - set(INIT_EVENTS)


def with_retention(settings: Settings, days: int) -> Settings:
    return settings.model_copy(update={"claims": settings.claims.model_copy(update={"event_retention_days": days})})


def test_the_default_keeps_events_30_days() -> None:
    assert load_settings(None).claims.event_retention_days == 30


def test_the_periodic_purge_deletes_old_events_and_keeps_recent_ones(settings: Settings) -> None:
    store = Store(settings.database)
    try:
        handlers = claim_handlers(with_retention(settings, 30), store)
        ages = {"years": 3 * 365 * DAY, "31d": 31 * DAY, "30d+1ms": 30 * DAY + 0.001}
        ages |= {"30d": 30 * DAY, "29d": 29 * DAY, "1s": 1, "now": 0}
        for name, age in ages.items():
            add_event(store, NOW - age, name)
        handlers.purge(NOW)
        assert event_names(store) == {"30d", "29d", "1s", "now"}  # exactly the window is kept
        handlers.purge(NOW)  # idempotent
        assert event_names(store) == {"30d", "29d", "1s", "now"}
    finally:
        store.close()


def test_zero_retention_keeps_every_event(settings: Settings) -> None:
    store = Store(settings.database)
    try:
        handlers = claim_handlers(with_retention(settings, 0), store)
        for years in (0, 1, 10, 40):
            add_event(store, NOW - years * 365 * DAY, f"{years}y")
        handlers.purge(NOW)
        assert event_names(store) == {"0y", "1y", "10y", "40y"}
    finally:
        store.close()


def test_a_purge_batch_reads_the_time_index_not_the_table(settings: Settings) -> None:
    """A batch touches its rows only, however many events there are: its write-lock time does not grow
    with the table."""
    store = Store(settings.database)
    if on_postgres(settings):
        plan = postgres_plan(store, "SELECT id FROM events WHERE time < ? ORDER BY time LIMIT ?")
        assert any("events_time" in line for line in plan) and not sorts_or_scans(plan, ("events",)), plan
        store.close()
        return
    try:
        plan = store.connection().execute(
            "EXPLAIN QUERY PLAN SELECT id FROM events WHERE time < ? ORDER BY time LIMIT ?", ("x", 10)
        )
        details = " ".join(str(row["detail"]) for row in plan)
        assert "USING INDEX events_time" in details or "USING COVERING INDEX events_time" in details, details
    finally:
        store.close()


OLD_EVENTS = 3000
BATCH = 100


COUNT_OLD = "SELECT COUNT(*) FROM events WHERE time < ?"
INSERT_EVENT = "INSERT INTO events (time, tenant, event, body) VALUES (?, '_', ?, '{}')"


def old_remaining(store: Store, cutoff: int) -> int:
    row = store.connection().execute(COUNT_OLD, (rfc3339(cutoff),)).fetchone()
    return int(row[0])


@pytest.mark.parametrize("writer", ["another-thread", "another-process"])
def test_the_purge_deletes_in_batches_and_lets_other_writers_in(settings: Settings, writer: str) -> None:
    """While a purge of a large backlog runs, another writer (a claim on another worker thread of the same
    Store, or of another bridge process: another Store on the same file) gets the write lock between its
    batches, and sees the backlog part-deleted.

    The writer writes once, then waits without the lock until the purge has committed another batch,
    then writes again: it must get in during the purge, not only after it. One DELETE for the whole
    backlog would show it only the full backlog or none.
    """
    store = Store(settings.database)
    other = store if writer == "another-thread" else Store(settings.database)
    cutoff = NOW - 30 * DAY
    try:
        with store.transaction() as tx:
            tx.connection.execute("DELETE FROM events")  # those `init` stored: this test counts every row
            for i in range(OLD_EVENTS):
                at = rfc3339(cutoff - OLD_EVENTS + i)
                tx.connection.execute(INSERT_EVENT, (at, "old"))
        result: list[int] = []
        purge = threading.Thread(target=lambda: result.append(store.purge_events(cutoff, batch=BATCH)))

        seen: list[int] = []  # old rows left, as each of the writer's transactions saw them
        purge.start()
        try:
            while True:
                with other.transaction() as tx:
                    left = int(tx.connection.execute(COUNT_OLD, (rfc3339(cutoff),)).fetchone()[0])
                    tx.connection.execute(INSERT_EVENT, (rfc3339(NOW), "claim"))
                seen.append(left)
                if left == 0:
                    break
                # Write again once the purge has committed another batch, not before.
                progressed = lambda n=left: old_remaining(other, cutoff) < n or not purge.is_alive()  # noqa: E731
                assert wait_for(progressed, timeout=60.0, interval=0.001), "the purge made no progress"
                if not purge.is_alive() and old_remaining(other, cutoff) == left:
                    break  # the purge failed: the asserts below say so
        finally:
            purge.join(60)
        during = [n for n in seen if 0 < n < OLD_EVENTS]
        print(f"\nRETENTION {writer}: in {len(during)} times during a purge of {OLD_EVENTS // BATCH} batches")
        assert during, f"the writer never got in while the purge ran: it saw {seen}"
        assert result == [OLD_EVENTS]
        assert old_remaining(store, cutoff) == 0
        assert event_names(store) == {"claim"} and store.count("events") == len(seen)  # the writer's all kept
    finally:
        if other is not store:
            other.close()
        store.close()
