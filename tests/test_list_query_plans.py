"""Every list the CLI, the admin API and the dashboard page through reads an index in its own order: a page costs
the same however many tenants or events there are (device and key pages: tests/test_device_admin.py,
tests/test_key_lifecycle.py). Checked on SQLite's own query plans, against the real schema."""

import itertools
import sqlite3
from collections.abc import Callable, Iterator

import pytest

from bridge.config import Settings
from bridge.storage.store import Store


@pytest.fixture
def store(initialised: tuple[Settings, str]) -> Iterator[Store]:
    opened = Store(initialised[0].database)
    yield opened
    opened.close()


def plans_of(store: Store, run: Callable[[], object]) -> list[list[str]]:
    """The query plan of each SELECT `run` makes."""
    statements: list[str] = []
    connection = store.connection()
    connection.set_trace_callback(lambda sql: statements.append(sql) if sql.lstrip().startswith("SELECT") else None)
    try:
        run()
    finally:
        connection.set_trace_callback(None)
    assert statements
    return [plan(connection, sql) for sql in statements]


def plan(connection: sqlite3.Connection, sql: str) -> list[str]:
    return [str(row[3]) for row in connection.execute("EXPLAIN QUERY PLAN " + sql)]


def assert_indexed_in_order(rows: list[str], rowid_walk: str | None = None) -> None:
    """Every table read through an index (or `rowid_walk`, a table read in its rowid order, newest first, which
    the LIMIT stops), and no sort."""
    on_tables = [row for row in rows if row.startswith(("SCAN ", "SEARCH ")) and row != f"SCAN {rowid_walk}"]
    if rowid_walk is not None and f"SCAN {rowid_walk}" in rows:
        on_tables.append("INDEX")
    assert on_tables and all(
        "INDEX" in row or "PRIMARY KEY" in row or "INTEGER PRIMARY KEY" in row for row in on_tables
    ), rows
    assert not any("TEMP B-TREE" in row for row in rows), rows  # the index gives the order: no sort of every match


@pytest.mark.parametrize("after", [None, "m"])
@pytest.mark.parametrize("one_tenant", [False, True])
def test_a_page_of_tenants_is_a_seek_on_their_names(store: Store, after: str | None, one_tenant: bool) -> None:
    tenant_id = store.tenant_id("default") if one_tenant else None
    for rows in plans_of(store, lambda: store.tenants(after, 100, tenant_id)):
        assert_indexed_in_order(rows)
        # Each tenant's counts read the tenant's part of an index, not every device or key.
        assert not any(row.startswith("SCAN devices") or row.startswith("SCAN provision_keys") for row in rows), rows


FILTERS = ["tenant", "event", "device_id", "before"]


@pytest.mark.parametrize(
    "given",
    [c for n in range(len(FILTERS) + 1) for c in itertools.combinations(FILTERS, n)],
    ids=lambda c: "+".join(c) or "none",
)
def test_a_page_of_events_reads_an_index_whatever_the_filters(store: Store, given: tuple[str, ...]) -> None:
    values = {"tenant": "default", "event": "device.provisioned", "device_id": "dev_x", "before": 1000}
    args = {name: (values[name] if name in given else None) for name in FILTERS}
    for rows in plans_of(
        store, lambda: store.events_page(args["tenant"], args["event"], args["device_id"], args["before"], 50)
    ):
        assert_indexed_in_order(rows, rowid_walk="events")
