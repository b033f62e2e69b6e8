"""bench/seed.py writes rows the bridge can read: a schema change that it does not follow fails here, in
`make test`, rather than an hour into `make bench` (its growth phases seed up to a million devices)."""

from bench.seed import seed_devices
from bridge.config import Settings
from bridge.storage.store import DeviceFilter, Store


def test_seeded_devices_are_rows_the_bridge_reads(initialised: tuple[Settings, str]) -> None:
    settings, _ = initialised
    done = seed_devices(settings.data_dir, 25)
    assert done["devices_total"] == 25
    store = Store(settings.database)
    try:
        page = store.devices_page(DeviceFilter(), None, 100)
        assert len(page) == 25 and all(d.status == "active" and d.credential_generation == 0 for d in page)
        assert store.device(page[0].id).hardware_id.startswith("seed-")
    finally:
        store.close()
