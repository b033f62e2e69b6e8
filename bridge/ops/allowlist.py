"""Pre-provisioning: the allowlist of hardware ids a tenant expects, one at a time or from a CSV file.

An entry may name the device (over the name its claim gives) and label it (over its key's labels); with
credentials, it also holds an admin-made device id and API key, shown once here, which the device then
receives (its claim's answer carries `api_key: ""`, as the key is already on it: PROTOCOL.md §7.1). A claim
that creates the device uses its entry up. A key made with `--preprovisioned-only` creates devices only for
hardware ids on its tenant's allowlist (reason `not_preprovisioned` otherwise).

A CSV import is all or nothing as users and claims see it, without holding the claim path's write lock for
long: every line is checked first (`parse_csv`, pure, then against the database), and nothing is written
while any line is wrong; then the entries go in `IMPORT_BATCH` rows per transaction, invisible to claims and
lists until the last transaction marks the import done: one row, whatever the import's size. An import that
fails midway, or whose process died, is removed again in slices as short, its rows never having been seen.

One thing can change under a running import: a claim with an ordinary key (which does not see staged entries)
may create the device for a hardware id the import holds. That device is the record; its entry is *skipped*,
neither on the allowlist nor dropped silently: `Imported.skipped` names each, and an `allowlist.import_skipped`
event with their count goes with the `allowlist.imported` one (whose count is the entries put on the list).
"""

import base64
import csv
import io
import time
import uuid
from dataclasses import dataclass, field

from bridge.claims import identifiers
from bridge.errors import InvalidImport, UsageError
from bridge.ops.admin import CLI_ACTOR, MAX_LABEL_CHARS, MAX_LABELS
from bridge.storage.records import AllowlistEntry
from bridge.storage.store import Store
from provwire.models import Event, rfc3339

MAX_PAGE = 1000
MAX_IMPORT_ENTRIES = 1_000_000
MAX_IMPORT_BYTES = 128 * 1024 * 1024
# Entries per staging transaction. Measured (bench/import_lock.py, this 2-core host, 100k and 1M rows): the write
# lock held p50 1.9-2.2 ms, p99 about 6 ms; p50 2.8-5.1 ms while other work kept the load average at 5. (At 500 it
# was p50 7-9 ms, p99 25-31 ms.)
IMPORT_BATCH = 200
IMPORT_PAUSE_SECONDS = 0.002  # between batches, so queued claims take the lock
CHECKPOINT_EVERY = 8  # slices between checkpoints: about 150 WAL pages, a few ms of copying done outside the lock
ABORT_BATCH = 1000  # staged rows removed per transaction when an import is undone
STALE_IMPORT_SECONDS = 3600  # an import still staging after this died with its process: removed by the next
SKIPPED_REASON = "device_created_during_import"
COLUMNS = ("hardware_id", "name", "labels")
MAX_HARDWARE_ID_CHARS = 128  # as a claim's
MAX_NAME_CHARS = 128


@dataclass(frozen=True)
class NewEntry:
    """What an operator puts on the allowlist for one hardware id."""

    hardware_id: str
    name: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Added:
    entry: AllowlistEntry
    api_key: str | None  # the admin-made API key, shown once; None without credentials


@dataclass(frozen=True)
class Imported:
    entries: int  # put on the allowlist (a dry run: that would be)
    dry_run: bool
    credentials: list[Added]  # with credentials: each entry's device id and API key, to show once
    skipped: list[str] = field(default_factory=list)  # hardware ids that became devices while the import ran


@dataclass(frozen=True)
class EntryPage:
    entries: list[AllowlistEntry]
    next_cursor: str | None


# --- checking what an operator gives (pure) ---------------------------------------------------------


def check_entry(new: NewEntry) -> str | None:
    """What is wrong with `new`, or None."""
    hw = new.hardware_id
    if not 1 <= len(hw) <= MAX_HARDWARE_ID_CHARS or not hw.isprintable() or any(c in hw for c in "+#/"):
        return f"hardware_id must be 1-{MAX_HARDWARE_ID_CHARS} printable characters without '+', '#' or '/'"
    if new.name is not None and (not 1 <= len(new.name) <= MAX_NAME_CHARS or not new.name.isprintable()):
        return f"name must be 1-{MAX_NAME_CHARS} printable characters"
    if len(new.labels) > MAX_LABELS:
        return f"at most {MAX_LABELS} labels"
    for name, value in new.labels.items():
        if not (1 <= len(name) <= MAX_LABEL_CHARS and len(value) <= MAX_LABEL_CHARS):
            return f"a label name is 1-{MAX_LABEL_CHARS} characters, its value at most {MAX_LABEL_CHARS}"
        if not (name.isprintable() and value.isprintable()) or any(c in name for c in "=;"):
            return "labels must be printable, and a label name has no '=' or ';'"
    return None


def parse_labels(text: str) -> dict[str, str]:
    """`name=value;name=value` (the CSV's labels column); ValueError for anything else."""
    labels: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"label {pair[:40]!r} must look like name=value")
        if name.strip() in labels:
            raise ValueError(f"label {name.strip()[:40]!r} given twice")
        labels[name.strip()] = value.strip()
    return labels


def parse_csv(data: bytes) -> tuple[list[tuple[int, NewEntry]], list[tuple[int, str]]]:
    """The entries of a CSV file (header `hardware_id[,name][,labels]`) with their line numbers, and every
    problem found (line, what). Pure: the database is checked by the caller."""
    if len(data) > MAX_IMPORT_BYTES:
        return [], [(0, f"the file is larger than {MAX_IMPORT_BYTES // (1024 * 1024)} MiB: split it")]
    try:
        text = data.decode("utf-8-sig")  # a BOM, as spreadsheets write, is not part of the first column's name
    except UnicodeDecodeError as exc:
        return [], [(text_line(data, exc.start), "not UTF-8")]
    rows = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [column.strip() for column in next(rows)]
    except StopIteration:
        return [], [(1, "empty file: the first line must be the header, e.g. hardware_id,name,labels")]
    except csv.Error as exc:
        return [], [(1, f"not CSV: {exc}")]
    unknown = [c for c in header if c not in COLUMNS]
    if "hardware_id" not in header or unknown or len(set(header)) != len(header):
        return [], [(1, f"the header must name hardware_id and may name name and labels, each once; got {header}")]
    entries: list[tuple[int, NewEntry]] = []
    problems: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    try:
        for row in rows:
            line = rows.line_num
            if not any(cell.strip() for cell in row):
                continue  # blank lines, as editors leave at the end
            if len(row) != len(header):
                problems.append((line, f"{len(row)} fields, the header has {len(header)}"))
                continue
            cells = dict(zip(header, row, strict=True))
            try:
                labels = parse_labels(cells.get("labels", ""))
            except ValueError as exc:
                problems.append((line, str(exc)))
                continue
            new = NewEntry(cells["hardware_id"].strip(), cells.get("name", "").strip() or None, labels)
            problem = check_entry(new)
            if problem is None and new.hardware_id in seen:
                problem = f"hardware_id {new.hardware_id[:40]!r} is on line {seen[new.hardware_id]} already"
            if problem is not None:
                problems.append((line, problem))
                continue
            seen[new.hardware_id] = line
            entries.append((line, new))
            if len(entries) > MAX_IMPORT_ENTRIES:
                return [], [(line, f"more than {MAX_IMPORT_ENTRIES} entries: split the file")]
    except csv.Error as exc:
        problems.append((rows.line_num, f"not CSV: {exc}"))
    return entries, problems


def text_line(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


# --- what operators do ------------------------------------------------------------------------


def add_entry(
    store: Store, tenant: str, new: NewEntry, with_credentials: bool, now: int, actor: str = CLI_ACTOR
) -> Added:
    """Put one hardware id on a tenant's allowlist (one transaction, an `allowlist.added` event)."""
    problem = check_entry(new)
    if problem is not None:
        raise UsageError(problem)
    added = _entry(store.tenant_id(tenant), new, with_credentials, now)
    store.add_allowlist_entry(added.entry, _event("allowlist.added", tenant, now, actor, new.hardware_id))
    return added


def remove_entry(store: Store, tenant: str, hardware_id: str, now: int, actor: str = CLI_ACTOR) -> None:
    tenant_id = store.tenant_id(tenant)
    store.remove_allowlist_entry(tenant_id, hardware_id, _event("allowlist.removed", tenant, now, actor, hardware_id))


def list_entries(store: Store, tenant: str, after: str | None, limit: int) -> EntryPage:
    """One page of a tenant's allowlist, newest first; `after` is the `next_cursor` of the page before."""
    if not 1 <= limit <= MAX_PAGE:
        raise UsageError(f"a page holds 1 to {MAX_PAGE} entries")
    cursor = None if after is None else _decode_cursor(after)
    found = store.allowlist_page(store.tenant_id(tenant), cursor, limit + 1)
    page, more = found[:limit], len(found) > limit
    last = page[-1] if page else None
    return EntryPage(page, _encode_cursor(last.created_at, last.hardware_id) if more and last else None)


def import_csv(
    store: Store,
    tenant: str,
    data: bytes,
    *,
    dry_run: bool = False,
    with_credentials: bool = False,
    now: int | None = None,
    actor: str = CLI_ACTOR,
) -> Imported:
    """Check a CSV file of allowlist entries and, unless `dry_run` or a line is wrong (InvalidImport, nothing
    written), put them all on the tenant's allowlist: all or nothing, in short transactions (module doc).

    An entry whose hardware id became a device while the import ran (a claim with an ordinary key) is skipped:
    not on the allowlist, not in `credentials`, named in `skipped`, counted by an `allowlist.import_skipped` event
    (reason `device_created_during_import`) beside `allowlist.imported`, whose count is the entries put on."""
    now = int(time.time()) if now is None else now
    tenant_id = store.tenant_id(tenant)
    entries, problems = parse_csv(data)
    conflicts = store.allowlist_conflicts(tenant_id, [new.hardware_id for _, new in entries])
    problems += [
        (line, f"hardware_id {new.hardware_id[:40]!r} {conflicts[new.hardware_id]}")
        for line, new in entries
        if new.hardware_id in conflicts
    ]
    if problems:
        raise InvalidImport(sorted(problems))
    if not entries:
        raise InvalidImport([(1, "no entries: the file has a header and nothing else")])
    if dry_run:
        return Imported(len(entries), True, [])
    remove_dead_imports(store, now - STALE_IMPORT_SECONDS)
    added = [_entry(tenant_id, new, with_credentials, now) for _, new in entries]
    import_id = f"imp_{uuid.uuid4().hex}"
    store.begin_import(import_id, tenant_id, len(added), now)
    # Staged in hardware id order: each slice then extends the same few pages of the allowlist's indexes, rather
    # than touching pages all over them as a shuffled file's lines would.
    staging = sorted((a.entry for a in added), key=lambda entry: entry.hardware_id)
    try:
        for n, start in enumerate(range(0, len(staging), IMPORT_BATCH), 1):
            store.stage_entries(import_id, staging[start : start + IMPORT_BATCH])
            if n % CHECKPOINT_EVERY == 0:
                store.checkpoint()  # outside the lock: see Store._checkpoint_deferred
            time.sleep(IMPORT_PAUSE_SECONDS)

        def events(listed: int, skipped: int) -> list[Event]:
            done = [_event("allowlist.imported", tenant, now, actor, None, count=listed)]
            if skipped:
                done.append(_event("allowlist.import_skipped", tenant, now, actor, None, skipped, SKIPPED_REASON))
            return done

        listed, skipped = store.finish_import(import_id, events)
    except BaseException:
        store.abort_import(import_id, ABORT_BATCH, IMPORT_PAUSE_SECONDS)
        raise
    gone = store.import_skipped(import_id) if skipped else []  # read after the end: no lock, no longer changing
    skipped_ids = set(gone)
    credentials = [a for a in added if a.entry.hardware_id not in skipped_ids] if with_credentials else []
    return Imported(listed, False, credentials, gone)


def remove_dead_imports(store: Store, started_before: int) -> int:
    """Remove imports still staging that started before `started_before` (their process died, or was stopped)
    and any whose removal was cut short: their entries were never visible. Returns how many."""
    dead = store.unfinished_imports(started_before)
    return sum(store.abort_import(import_id, ABORT_BATCH, IMPORT_PAUSE_SECONDS) for import_id in dead)


# --- helpers -------------------------------------------------------------------------------------


def _entry(tenant_id: str, new: NewEntry, with_credentials: bool, now: int) -> Added:
    api_key = identifiers.new_api_key() if with_credentials else None
    entry = AllowlistEntry(
        tenant_id=tenant_id,
        hardware_id=new.hardware_id,
        device_id=identifiers.new_device_id(now) if with_credentials else None,
        api_key_hash=None if api_key is None else identifiers.digest(api_key),
        name=new.name,
        labels=dict(new.labels),
        created_at=now,
    )
    return Added(entry, api_key)


def _event(
    name: str,
    tenant: str,
    now: int,
    actor: str,
    hardware_id: str | None,
    count: int | None = None,
    reason: str | None = None,
) -> Event:
    return Event(
        event=name, time=rfc3339(now), tenant=tenant, hardware_id=hardware_id, actor=actor, count=count, reason=reason
    )


def _encode_cursor(created_at: int, hardware_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at}:{hardware_id}".encode()).decode().rstrip("=")


def _decode_cursor(text: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("utf-8")
        created_at, hardware_id = raw.split(":", 1)
        cursor = (int(created_at), hardware_id)
    except ValueError:
        raise UsageError(f"{text[:40]!r} is not a cursor from a previous page") from None
    if _encode_cursor(*cursor) != text:
        raise UsageError(f"{text[:40]!r} is not a cursor from a previous page")
    return cursor
