"""The claim worker's group commit (`Store.batch`, `ClaimHandlers.handle_batch`): the messages that arrive
together share one database transaction, each claim a savepoint of it, without changing any answer.
Real SQLite and PostgreSQL, real crypto, the handlers the claim worker runs; no broker needed."""

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from bridge import logs
from bridge.config import Settings
from bridge.edges.core import ClaimHandlers, claim_handlers
from bridge.errors import StorageError
from bridge.ops import admin
from bridge.storage.store import Store
from provwire import crypto, topics
from provwire.errors import ErrorCode
from provwire.models import Claim, ClaimError, ClaimOk, to_json
from tests.helpers.storage import holding_the_write_lock, impatient, is_write_begin, on_postgres, sqlite_only, traced

# Storage-dependent: each test runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    opened = Store(settings.database)
    yield opened
    opened.close()


def claim(settings: Settings, key: str, hardware_id: str | None = None) -> tuple[str, bytes]:
    """(topic, payload) of a claim by a new device."""
    hardware_id = hardware_id or f"hw-{uuid.uuid4().hex[:12]}"
    public_key = crypto.b64encode(crypto.sec1(crypto.generate_private_key().public_key()))
    payload = Claim(request_id=uuid.uuid4().hex, provision_key=key, hardware_id=hardware_id, public_key=public_key)
    return topics.claim_topic(settings.topic_prefix, hardware_id), to_json(payload)


def statuses(handlers: ClaimHandlers, messages: list[tuple[str, bytes]]) -> list[str]:
    return [json.loads(outcome.answer or b"{}").get("status", "") for outcome in handlers.handle_batch(messages)]


def test_messages_of_a_batch_share_one_transaction_and_get_the_answers_they_would_alone(
    initialised: tuple[Settings, str], store: Store
) -> None:
    settings, key = initialised
    handlers = claim_handlers(settings, store)
    one_time = admin.create_key(store, settings, admin.KeySpec("default", "once", max_registrations=1), 0)[1]
    messages = [claim(settings, key) for _ in range(10)]
    messages += [claim(settings, one_time), claim(settings, one_time)]  # the one-time key, twice in one batch
    messages.append((messages[0][0], b"{not json"))
    with traced(store) as statements:
        outcomes = handlers.handle_batch(messages)
    answers = [json.loads(o.answer or b"{}") for o in outcomes]
    assert [a["status"] for a in answers[:10]] == ["ok"] * 10
    assert sorted(a["status"] for a in answers[10:12]) == ["error", "ok"]  # exactly one device for the key
    assert answers[12]["code"] == ErrorCode.VALIDATION_ERROR
    assert store.count("devices") == 11
    # The malformed claim's event is stored when it is refused, before the write lock is taken for the
    # others; then one transaction for all twelve claims, each claim's writes a savepoint of it.
    assert [s == "COMMIT" for s in statements if is_write_begin(s) or s == "COMMIT"] == [False, True] * 2
    batch = statements[max(i for i, s in enumerate(statements) if is_write_begin(s)) :]
    assert sum(s.startswith("SAVEPOINT") for s in batch) >= 12


def test_a_failed_unit_of_a_batch_is_undone_alone(store: Store) -> None:
    with store.batch():
        store.create_tenant("t-1", "first", 0, "test")
        with pytest.raises(RuntimeError), store.transaction() as tx:
            tx.connection.execute("INSERT INTO tenants VALUES ('t-2', 'second', 0)")
            raise RuntimeError("this unit fails after writing")
        store.create_tenant("t-3", "third", 0, "test")
    names = {t.name for t in store.tenants()}
    assert {"first", "third"} <= names and "second" not in names


def test_a_batch_keeps_its_savepoint_journal_in_memory(initialised: tuple[Settings, str], store: Store) -> None:
    """Left to its default, SQLite writes the journal of a batch's savepoints to a temporary file, created,
    written page by page and deleted every batch (a tenth of the claim worker's CPU, docs/BENCHMARKS.md). A
    batch keeps it in memory: no temporary file is open at any statement of the batch."""
    settings, key = initialised
    sqlite_only(settings, "the journal of SQLite's savepoints")
    handlers = claim_handlers(settings, store)

    def temporary_files() -> list[str]:
        links = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):  # the descriptor of the listing itself, closed by now
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
        return [link for link in links if "etilqs_" in link]  # SQLite's name for them (unlinked, still open)

    seen: list[str] = []
    store.connection().set_trace_callback(lambda sql: seen.extend(temporary_files()))
    for _ in range(3):
        assert statuses(handlers, [claim(settings, key) for _ in range(8)]) == ["ok"] * 8
    store.connection().set_trace_callback(None)
    assert seen == []


def test_a_batch_that_cannot_begin_writes_nothing_and_answers_every_claim_retry(
    initialised: tuple[Settings, str], store: Store
) -> None:
    settings, key = initialised
    handlers = claim_handlers(settings, store)
    impatient(store)
    with holding_the_write_lock(settings):  # another writer holds the database
        outcomes = handlers.handle_batch([claim(settings, key) for _ in range(3)])
    for outcome in outcomes:
        assert outcome.answer is not None
        answer = ClaimError.model_validate_json(outcome.answer)
        assert answer.code is ErrorCode.INTERNAL_ERROR and answer.retry_after and not outcome.events
    assert store.count("devices") == 0
    assert statuses(handlers, [claim(settings, key)]) == ["ok"]  # and the next batch goes through


def test_a_claim_replayed_within_its_own_batch_gets_the_same_answer(
    initialised: tuple[Settings, str], store: Store
) -> None:
    """The broker redelivers a claim while the first copy is in the same batch: one device, one answer."""
    settings, key = initialised
    handlers = claim_handlers(settings, store)
    message = claim(settings, key)
    first, again = handlers.handle_batch([message, message])
    assert first.answer == again.answer and ClaimOk.model_validate_json(first.answer or b"").created
    assert store.count("devices") == 1


def test_a_batch_that_fails_to_commit_takes_its_units_with_it(store: Store) -> None:
    store.create_tenant("t-9", "alone", int(time.time()), "test")
    with pytest.raises(StorageError), store.batch():
        store.create_tenant("t-10", "in-a-batch", 0, "test")
        store.connection().execute("INSERT INTO tenants VALUES ('t-9', 'duplicate id', 0)")
    names = {t.name for t in store.tenants()}
    assert "alone" in names and "in-a-batch" not in names


def test_a_batch_sqlite_rolled_back_commits_none_of_its_later_units(settings: Settings, store: Store) -> None:
    """A full disk makes SQLite roll the whole transaction back: a unit after that must fail too, not
    become a transaction of its own that commits while the batch reports failure."""
    sqlite_only(settings, "SQLite rolls a whole transaction back on a full disk (PostgreSQL's errors abort it)")
    conn = store.connection()
    room = int(conn.execute("PRAGMA max_page_count").fetchone()[0])
    with pytest.raises(StorageError), store.batch():
        store.create_tenant("t-1", "first", 0, "test")
        conn.execute(f"PRAGMA max_page_count = {int(conn.execute('PRAGMA page_count').fetchone()[0])}")
        with pytest.raises(StorageError), store.transaction() as tx:
            tx.connection.execute("INSERT INTO tenants VALUES ('t-2', ?, 0)", ("x" * 100_000,))  # disk full
        conn.execute(f"PRAGMA max_page_count = {room}")
        with pytest.raises(StorageError):
            store.create_tenant("t-3", "third", 0, "test")
    names = {t.name for t in store.tenants()}
    assert "first" not in names and "third" not in names


def counter_value(name: str) -> float:
    """A counter of this process's metrics registry (the handlers run here, as in a claim worker)."""
    value = REGISTRY.get_sample_value(name)
    return 0.0 if value is None else value


def test_each_message_of_a_batch_is_reported_once_after_the_commit_with_its_own_request_id(
    initialised: tuple[Settings, str], store: Store
) -> None:
    """A claim's line and metrics say what its device is answered: made once the batch is committed (or known not
    to be), each tagged with its own request_id, not the last one the batch bound."""
    settings, key = initialised
    handlers = claim_handlers(settings, store)
    reported: list[tuple[str, str | None]] = []
    handlers.report = lambda _topic, outcome: reported.append((outcome.summary, logs.current_request_id()))
    messages = [claim(settings, key) for _ in range(3)]
    request_ids = [json.loads(payload)["request_id"] for _, payload in messages]
    handlers.handle_batch(messages)
    assert [request_id for _, request_id in reported] == request_ids
    assert all(summary.startswith("device.provisioned") for summary, _ in reported)

    reported.clear()
    impatient(store)
    failed_before = counter_value("provbridge_database_errors_total")
    with holding_the_write_lock(settings):  # the batch cannot be written: each claim is reported as answered
        messages = [claim(settings, key) for _ in range(2)]
        handlers.handle_batch(messages)
    assert [summary for summary, _ in reported] == [ErrorCode.INTERNAL_ERROR.value] * 2
    assert [request_id for _, request_id in reported] == [json.loads(payload)["request_id"] for _, payload in messages]
    assert counter_value("provbridge_database_errors_total") == failed_before + 1  # one failed transaction


def test_a_statement_that_fails_in_a_batch_undoes_its_unit_on_sqlite_and_the_batch_on_postgresql(
    settings: Settings, store: Store
) -> None:
    """SQLite reports a failed statement at once: its unit is undone alone. PostgreSQL's batch runs in pipeline mode
    (its writes sent without waiting), so the failure may surface in a later unit: the whole batch is undone and
    reported (its claims are answered retry). Either way nothing of a failed unit is committed."""
    store.create_tenant("t-0", "zero", 0, "test")
    before = {t.name for t in store.tenants()}
    undone_whole = pytest.raises(StorageError) if on_postgres(settings) else contextlib.nullcontext()
    with undone_whole, store.batch():
        store.create_tenant("t-1", "first", 0, "test")
        with contextlib.suppress(StorageError), store.transaction() as tx:
            tx.connection.execute("INSERT INTO tenants VALUES ('t-2', 'zero', 0)")  # the name is taken: it fails
        store.create_tenant("t-3", "third", 0, "test")
    after = {t.name for t in store.tenants()}
    assert after == (before if on_postgres(settings) else before | {"first", "third"})
    store.create_tenant("t-4", "fourth", 0, "test")  # and the store goes on
