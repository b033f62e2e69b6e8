"""Issue 12: the operator dashboard (/ui/) in a real headless Chromium (Debian's `chromium`, driven by Playwright;
no browser is downloaded), against a real `provbridge serve` with the embedded broker: log in with an admin token,
create a key and see its value once, see a device provisioned with it appear live with its presence (the server's
event stream, no click or reload), revoke it from its detail panel; a hostile key name renders as text.

The rest of what issue 12 asks of the dashboard, on one server and one logged-in browser for the module, against
devices claimed by the simulator (hardware, network, labels): the device search (device id, hardware-id prefix) and
filters (tenant, status, label, presence, the last one live); a device's hardware, network, labels and events;
bulk one-time codes shown once and downloaded as CSV; a key's use limit changed, the key revoked and reinstated
(with real claims refused and taken); the allowlist: an entry added, with credentials shown once, and a CSV import,
dry run (each bad line named, nothing imported) then for real. Every flow is watched: the admin token travels
once, in the login's body, never in a URL, a header or the page's storage.

Chromium is installed by `make test` (`make chromium`, bridge/api/install-chromium.sh); without it the test is
skipped, except under CI, where it fails (as the Mosquitto tests do).
"""

import csv
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    FilePayload,
    Page,
    Request,
    expect,
    sync_playwright,
)
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from bridge.claims import identifiers
from bridge.config import Settings
from bridge.ops import admin, allowlist, devices
from bridge.storage.records import AllowlistEntry
from device_sim.device import DeviceIdentity, claim_over_mqtt
from provwire.models import ClaimError, ClaimOk, Credentials, Hardware, Network
from tests.helpers.api import Api, serve_with_api
from tests.helpers.bridge import Bridge, make_settings
from tests.helpers.devices import Device, claim_devices
from tests.helpers.mqtt import token_session
from tests.helpers.refresh import provisioned
from tests.helpers.waiting import wait_for

CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright drives it as it is
WAIT_MS = 20_000  # generous: every wait below is for a condition, never for a duration
HOSTILE_NAME = "<img src=x onerror=window.__pwned=1>"
LIST_PAGE = 100  # devices a page of the dashboard's list shows (`PAGE` in bridge/api/static/app.js)


def require_chromium() -> str:
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"Chromium ({CHROMIUM}) is not installed but CI is set: `make test` (make chromium) installs it")
    pytest.skip(f"Chromium ({CHROMIUM}) is not installed (`make chromium`); under CI this fails instead")


@dataclass(frozen=True)
class Served:
    bridge: Bridge
    api: Api
    token: str  # an admin token with the write scope, every tenant
    base: str  # http://127.0.0.1:<admin API port>


@pytest.fixture
def served(initialised: tuple[Settings, str]) -> Iterator[Served]:
    """`provbridge serve` as a subprocess (embedded broker, the admin API in its own process), and a write token."""
    with serve_with_api(*initialised, "write") as (bridge, api, token):
        yield Served(bridge, api, token, f"http://127.0.0.1:{api.port}")


@dataclass
class Watched:
    """What the page did besides what it shows: every request it sent, script errors, CSP refusals."""

    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, URL, body
    headers: list[str] = field(default_factory=list)  # each request's headers, as JSON
    errors: list[str] = field(default_factory=list)
    csp: list[str] = field(default_factory=list)

    def on_request(self, request: Request) -> None:
        self.requests.append((request.method, request.url, request.post_data))
        self.headers.append(json.dumps(request.headers))

    def on_console(self, message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            self.csp.append(message.text)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = require_chromium()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser, served: Served) -> Iterator[tuple[Page, Watched]]:
    context = browser.new_context()
    opened = context.new_page()
    opened.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)
    watched = Watched()
    opened.on("request", watched.on_request)
    opened.on("console", watched.on_console)
    opened.on("pageerror", lambda error: watched.errors.append(str(error)))
    try:
        yield opened, watched
    finally:
        context.close()
    assert watched.csp == [], watched.csp  # nothing the server's CSP had to refuse: no inline script or style
    assert watched.errors == [], watched.errors


def kept_by_the_page(page: Page) -> str:
    """Everything the page could have kept a secret in, besides its DOM: URL, history, cookies, storage."""
    return str(
        page.evaluate(
            "() => JSON.stringify([location.href, history.length, document.cookie, "
            "Object.entries(localStorage), Object.entries(sessionStorage)])"
        )
    )


def log_in(page: Page, served: Served) -> None:
    page.goto(f"{served.base}/ui/")
    expect(page.get_by_test_id("login-form")).to_be_visible()
    page.get_by_test_id("login-token").fill(served.token)
    page.get_by_test_id("login-submit").click()
    expect(page.get_by_test_id("app")).to_be_visible()
    expect(page.get_by_test_id("login-form")).to_be_hidden()
    expect(page.get_by_test_id("login-token")).to_have_value("")  # the page keeps no copy


def create_key(page: Page, name: str, max_registrations: str = "") -> str:
    """Create a key in the Keys tab; its value, read from the box that shows it once."""
    page.locator("#key-name").fill(name)
    page.locator("#key-max").fill(max_registrations)
    page.get_by_test_id("key-create-submit").click()
    shown = page.get_by_test_id("key-secret-value")
    expect(page.get_by_test_id("key-secret")).to_be_visible()
    expect(shown).to_have_text(re.compile(r"^pk_[A-Za-z0-9_-]{20,}$"))
    return str(shown.text_content())


def test_log_in_create_a_key_see_a_device_live_and_revoke_it(served: Served, page: tuple[Page, Watched]) -> None:
    p, watched = page

    # A wrong token: the server's message, in the login form's alert; the input is emptied all the same.
    p.goto(f"{served.base}/ui/")
    p.get_by_test_id("login-token").fill("pba_" + "A" * 43)
    p.get_by_test_id("login-submit").click()
    expect(p.get_by_test_id("login-error")).to_be_visible()
    expect(p.get_by_test_id("login-error")).not_to_have_text("")
    expect(p.get_by_test_id("login-token")).to_have_value("")
    expect(p.get_by_test_id("app")).to_be_hidden()

    log_in(p, served)
    assert served.token not in kept_by_the_page(p)

    # A key, its value shown once: gone when dismissed, and not back after a reload (the session stays).
    p.locator("#tab-keys").click()
    value = create_key(p, "line-9", "5")
    row = p.get_by_test_id("key-row").filter(has_text="line-9")
    expect(row.locator("[data-col=registrations]")).to_have_text("0 / 5")
    assert value not in kept_by_the_page(p)
    p.get_by_test_id("key-secret-dismiss").click()
    expect(p.get_by_test_id("key-secret")).to_be_hidden()
    assert value not in p.content()
    p.reload()
    expect(p.get_by_test_id("app")).to_be_visible()  # the session cookie, no login form
    expect(p.get_by_test_id("login-form")).to_be_hidden()
    p.locator("#tab-keys").click()
    expect(p.get_by_test_id("key-row").filter(has_text="line-9")).to_be_visible()
    expect(p.get_by_test_id("key-secret")).to_be_hidden()
    assert value not in p.content() and value not in kept_by_the_page(p)

    # A hostile name is text: no element made of it, no script run. Moving to another tab hides a value shown once.
    create_key(p, HOSTILE_NAME)
    hostile = p.get_by_test_id("key-row").filter(has_text=HOSTILE_NAME)
    expect(hostile.locator("[data-col=name]")).to_have_text(HOSTILE_NAME)
    assert p.locator("#keys-table img").count() == 0
    assert p.evaluate("() => window.__pwned") is None
    p.locator("#tab-devices").click()
    expect(p.get_by_test_id("key-secret")).to_be_hidden()
    expect(p.get_by_test_id("key-secret-value")).to_have_text("")

    # A device provisioned with that key appears, then comes online and goes offline, with no click or reload:
    # the page's own marker survives, so it was never reloaded.
    expect(p.get_by_test_id("stream-status")).to_have_text("live")
    p.evaluate("() => { window.__marker = 'not reloaded'; }")
    device, creds = provisioned(served.bridge, value)
    device_row = p.locator(f'tr[data-device-id="{device.device_id}"]')
    expect(device_row.locator("[data-col=hardware_id]")).to_have_text(device.hardware_id)
    expect(device_row.locator("[data-col=status]")).to_have_text("active")
    with token_session(served.bridge.port, creds.mqtt):
        expect(device_row.locator("[data-col=presence]")).to_have_text("online")
    expect(device_row.locator("[data-col=presence]")).to_have_text("offline")
    assert p.evaluate("() => window.__marker") == "not reloaded"

    # Its detail (with its events), then revoked from there: the page and the store agree.
    device_row.click()
    expect(p.get_by_test_id("detail-id")).to_have_text(device.device_id)
    expect(p.get_by_test_id("detail-hardware-id")).to_have_text(device.hardware_id)
    expect(p.get_by_test_id("detail-status")).to_have_text("active")
    expect(p.get_by_test_id("detail-presence")).to_have_text("offline")
    expect(p.get_by_test_id("detail-events")).to_contain_text("device.provisioned")
    p.get_by_test_id("device-revoke").click()
    expect(p.get_by_test_id("detail-status")).to_have_text("revoked")
    expect(device_row.locator("[data-col=status]")).to_have_text("revoked")
    expect(p.get_by_test_id("device-revoke")).to_be_hidden()
    expect(p.get_by_test_id("device-reinstate")).to_be_visible()
    assert served.bridge.store.device(device.device_id).status == "revoked"
    answer = served.api.request("GET", f"/v1/devices/{device.device_id}", served.token)
    assert answer.status == 200 and answer.json()["status"] == "revoked"
    revoked = served.bridge.store.events(event="device.revoked", device_id=device.device_id)
    assert len(revoked) == 1 and str(revoked[0]["actor"]).startswith("api:adm_")

    # The live list has the claim and the presence changes, newest first.
    p.locator("#tab-events").click()
    provisioned_row = p.locator('#events-body tr[data-event="device.provisioned"]').filter(has_text=device.device_id)
    expect(provisioned_row).to_be_visible()
    expect(p.locator('#events-body tr[data-kind="presence"]').filter(has_text=device.device_id)).to_have_count(2)
    expect(p.locator("#events-body tr").first).to_contain_text("presence offline")

    # Logged out: the session is gone on the server too, and a reload shows the login form.
    p.get_by_test_id("logout").click()
    expect(p.get_by_test_id("login-form")).to_be_visible()
    expect(p.get_by_test_id("app")).to_be_hidden()
    assert p.request.get(f"{served.base}/ui/session").status == 401
    p.reload()
    expect(p.get_by_test_id("login-form")).to_be_visible()

    # The token travelled once, in the body of POST /ui/session; the key's value in no request at all.
    carried = [(method, url) for method, url, body in watched.requests if served.token in (body or "")]
    assert carried == [("POST", f"{served.base}/ui/session")], carried
    assert not any(served.token in sent for sent in watched.headers)  # no Authorization header: the cookie
    assert not any(served.token in url or value in url or value in (body or "") for _, url, body in watched.requests)
    logged_in = [json.loads(body or "{}") for method, url, body in watched.requests if url.endswith("/ui/session")]
    assert {"token": served.token} in logged_in


def test_a_list_of_several_pages_stays_and_counts_what_is_new(
    served: Served, page: tuple[Page, Watched], initialised: tuple[Settings, str]
) -> None:
    """Live claims refresh the first page; once the user asked for more pages, they stay, and a button says how
    many devices came since (a factory's stream of claims would otherwise throw the pages away every moment)."""
    p, _ = page
    claim_devices(initialised[0], served.bridge.store, initialised[1], LIST_PAGE + 5)
    seeded_at = int(time.time())
    log_in(p, served)
    expect(p.get_by_test_id("stream-status")).to_have_text("live")
    rows = p.get_by_test_id("device-row")
    expect(rows).to_have_count(LIST_PAGE)
    p.get_by_test_id("devices-more").click()
    expect(rows).to_have_count(LIST_PAGE + 5)

    # Newest first is by creation second, then id: a second later than every seeded device, it heads the list.
    assert wait_for(lambda: int(time.time()) > seeded_at)
    device, _ = provisioned(served.bridge)
    newer = p.get_by_test_id("devices-newer")
    expect(newer).to_be_visible()
    expect(newer).to_contain_text("1 new")
    expect(rows).to_have_count(LIST_PAGE + 5)  # the pages asked for are still there
    assert p.locator(f'tr[data-device-id="{device.device_id}"]').count() == 0

    newer.click()
    expect(rows.first).to_have_attribute("data-device-id", device.device_id)
    expect(rows).to_have_count(LIST_PAGE)
    expect(newer).to_be_hidden()


# --- the rest of the dashboard, on one server and one logged-in browser for the whole module ----------------
#
# A fleet made by real claims through the embedded broker (the simulator's claim, with hardware and network
# facts; labels from the keys), on two tenants; one device revoked, one seen and gone offline. The tests below
# create keys, codes and allowlist entries of their own; the only devices they make are the keys test's claims,
# in tenant `keys-t`, never connected (the filters test counts them in), so the tests run in any order.

SITE_LYON = {"site": "lyon", "line": "1"}
HOSTILE_HOST = "<svg onload=window.__pwned=2>"
HOSTILE_DEVICE = "<img src=x onerror=window.__pwned=3>"


@dataclass(frozen=True)
class FleetDevice:
    device_id: str
    hardware_id: str
    credentials: Credentials
    hardware: Hardware
    network: Network


@dataclass(frozen=True)
class Fleet:
    served: Served
    devices: dict[str, FleetDevice]  # by hardware id

    def id(self, hardware_id: str) -> str:
        return self.devices[hardware_id].device_id


def simulated(bridge: Bridge, key: str, hardware_id: str, n: int, name: str | None = None) -> FleetDevice:
    """A device claimed by the project's simulator over MQTT, with the hardware and network facts it reports."""
    hardware = Hardware(
        board_model="Raspberry Pi 4 Model B",
        cpu_cores=4,
        ram_mb=3796 + n,
        os="Debian GNU/Linux 12",
        arch="aarch64",
        kernel=f"6.1.0-rpi{n}",
    )
    network = Network(
        hostname=f"{hardware_id}.plant",
        ip=f"10.20.0.{10 + n}",
        mac=f"dc:a6:32:00:00:{n:02x}",
        connection_type="ethernet",
    )
    if name == HOSTILE_DEVICE:
        network = network.model_copy(update={"hostname": HOSTILE_HOST})
    claimed = claim_over_mqtt(
        "127.0.0.1",
        bridge.port,
        DeviceIdentity.generate(hardware_id),
        key,
        bridge.keys.cloud_key.public_key(),
        timeout=10,
        hardware=hardware,
        network=network,
        device_name=name,
    )
    assert claimed.created
    return FleetDevice(claimed.device_id, hardware_id, claimed.credentials, hardware, network)


def api_ok(served: Served, method: str, path: str, body: object = None) -> Any:
    answer = served.api.request(method, path, served.token, body)
    assert answer.status in (200, 201), (method, path, answer.status, answer.body)
    return answer.json()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    settings = make_settings(tmp_path_factory.mktemp("dashboard") / "data")
    first_key = admin.init_data_dir(settings).provision_key
    assert first_key
    with serve_with_api(settings, first_key, "write") as (bridge, api, token):
        served = Served(bridge, api, token, f"http://127.0.0.1:{api.port}")
        api_ok(served, "POST", "/v1/tenants", {"name": "acme"})
        api_ok(served, "POST", "/v1/tenants", {"name": "keys-t"})
        lyon = api_ok(served, "POST", "/v1/keys", {"name": "lyon-line", "labels": SITE_LYON})["provision_key"]
        oslo = api_ok(served, "POST", "/v1/keys", {"name": "oslo-line", "labels": {"site": "oslo"}})["provision_key"]
        acme = api_ok(
            served,
            "POST",
            "/v1/keys",
            {"name": "acme-line", "tenant": "acme", "labels": {"site": "lyon", "owner": "acme"}},
        )["provision_key"]
        made = [
            simulated(bridge, lyon, "press-001", 1),
            simulated(bridge, lyon, "press-002", 2),
            simulated(bridge, oslo, "drill-001", 3, HOSTILE_DEVICE),
            simulated(bridge, acme, "press-101", 4, "acme press"),
        ]
        by_hardware_id = {d.hardware_id: d for d in made}
        api_ok(served, "POST", f"/v1/devices/{by_hardware_id['press-002'].device_id}/revoke")
        # drill-001 connects and goes: seen, offline (the bridge writes presence in batches).
        with token_session(bridge.port, by_hardware_id["drill-001"].credentials.mqtt):
            pass
        drill = by_hardware_id["drill-001"].device_id
        assert wait_for(lambda: bridge.store.device(drill).online is False, timeout=30)
        yield Fleet(served, by_hardware_id)


@dataclass(frozen=True)
class Console:
    """One browser context, logged in once, for the module: every page a test opens shares its session."""

    fleet: Fleet
    context: BrowserContext
    watched: Watched


@pytest.fixture(scope="module")
def console(browser: Browser, fleet: Fleet) -> Iterator[Console]:
    served = fleet.served
    context = browser.new_context(accept_downloads=True)
    watched = Watched()
    context.on("request", watched.on_request)
    first = context.new_page()
    first.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)
    log_in(first, served)
    first.close()
    try:
        yield Console(fleet, context, watched)
    finally:
        context.close()
    # Every flow below: the admin token went to the server once, in the body of the login, and in no URL, no
    # header (the session is a cookie that holds no token) and no other body.
    carried = [(method, url) for method, url, body in watched.requests if served.token in (body or "")]
    assert carried == [("POST", f"{served.base}/ui/session")], carried
    assert not any(served.token in url for _, url, _ in watched.requests)
    assert not any(served.token in sent for sent in watched.headers)
    assert len(watched.requests) > 20  # the flows were watched


@pytest.fixture
def ui(console: Console) -> Iterator[Page]:
    """A new tab of the logged-in browser, at the dashboard (the session cookie: no login form)."""
    served = console.fleet.served
    opened = console.context.new_page()
    opened.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)
    watched = Watched()
    opened.on("console", watched.on_console)
    opened.on("pageerror", lambda error: watched.errors.append(str(error)))
    opened.goto(f"{served.base}/ui/")
    expect(opened.get_by_test_id("app")).to_be_visible()
    expect(opened.get_by_test_id("stream-status")).to_have_text("live")
    try:
        yield opened
        # Nothing the page keeps (URL, history, cookies it can read, storage) and no cookie at all holds the token.
        assert served.token not in kept_by_the_page(opened)
        assert not any(served.token in str(cookie.get("value")) for cookie in console.context.cookies())
        assert served.token not in opened.content()
    finally:
        opened.close()
    assert watched.csp == [], watched.csp
    assert watched.errors == [], watched.errors


def listed(p: Page) -> list[str]:
    return list(p.locator("#devices-body tr").evaluate_all("rows => rows.map((row) => row.dataset.deviceId)"))


def expect_listed(p: Page, ids: list[str], ordered: bool = False) -> None:
    """Wait until the device list shows exactly `ids` (in this order when `ordered`)."""
    want = ids if ordered else sorted(ids)
    try:
        p.wait_for_function(
            """([want, ordered]) => {
                 const shown = [...document.querySelectorAll("#devices-body tr")].map((row) => row.dataset.deviceId);
                 if (!ordered) shown.sort();
                 return JSON.stringify(shown) === JSON.stringify(want);
               }""",
            arg=[want, ordered],
            timeout=WAIT_MS,
        )
    except PlaywrightTimeout:
        raise AssertionError(f"the list shows {listed(p)}, not {want}") from None
    if ids:
        expect(p.locator("#devices-empty")).to_be_hidden()
    else:
        expect(p.locator("#devices-empty")).to_be_visible()


def search(p: Page, q: str = "", label: str = "") -> None:
    p.locator("#devices-q").fill(q)
    p.locator("#devices-label").fill(label)
    p.locator("#devices-filter button[type=submit]").click()


def fields_of(p: Page, dl: str) -> dict[str, str]:
    """A <dl> of the detail panel as the operator reads it: each term and its description."""
    return dict(
        p.evaluate(
            """(id) => {
                 const pairs = [];
                 for (const node of document.getElementById(id).children) {
                   if (node.tagName === "DT") pairs.push([node.textContent, null]);
                   else pairs[pairs.length - 1][1] = node.textContent;
                 }
                 return pairs;
               }""",
            dl,
        )
    )


def test_devices_search_and_filter_by_tenant_status_label_and_presence(console: Console, ui: Page) -> None:
    p, fleet = ui, console.fleet
    press1, press2, drill, acme = (fleet.id(h) for h in ("press-001", "press-002", "drill-001", "press-101"))
    # Besides the fleet, only the keys test's claims (tenant keys-t, never connected) make devices in this module.
    store = fleet.served.bridge.store
    made_by_keys_test = devices.list_devices(store, devices.device_filter(store.tenant_id("keys-t")), None, 100)
    keys_t = [d.id for d in made_by_keys_test.devices]
    everyone = [press1, press2, drill, acme, *keys_t]
    expect_listed(p, everyone)

    # Search: a hardware-id prefix (listed in hardware-id order), a device id exactly, nothing.
    search(p, "press-")
    expect_listed(p, [press1, press2, acme], ordered=True)
    search(p, "press-0")
    expect_listed(p, [press1, press2], ordered=True)
    search(p, drill)
    expect_listed(p, [drill])
    expect(p.locator(f'tr[data-device-id="{drill}"] [data-col=hardware_id]')).to_have_text("drill-001")
    search(p, "ress-")  # a prefix, not a substring
    expect_listed(p, [])
    search(p, "")
    expect_listed(p, everyone)

    # Tenant (a select: applied when it changes), and with a prefix search at once.
    p.locator("#devices-tenant").select_option("acme")
    expect_listed(p, [acme])
    expect(p.locator(f'tr[data-device-id="{acme}"] [data-col=tenant]')).to_have_text("acme")
    p.locator("#devices-tenant").select_option("default")
    expect_listed(p, [press1, press2, drill])
    search(p, "press-")
    expect_listed(p, [press1, press2], ordered=True)
    p.locator("#devices-tenant").select_option("keys-t")
    expect_listed(p, [])  # the prefix matches none of its devices
    search(p, "")
    expect_listed(p, keys_t)
    p.locator("#devices-tenant").select_option(value="")

    # Status.
    p.locator("#devices-status").select_option("revoked")
    expect_listed(p, [press2])
    expect(p.locator(f'tr[data-device-id="{press2}"] [data-col=status]')).to_have_text("revoked")
    p.locator("#devices-status").select_option("active")
    expect_listed(p, [i for i in everyone if i != press2])
    p.locator("#devices-status").select_option(value="")

    # Label NAME=VALUE: on every tenant, then with the tenant too; a bad filter is the server's message.
    search(p, label="site=lyon")
    expect_listed(p, [press1, press2, acme])
    search(p, label="site=oslo")
    expect_listed(p, [drill])
    search(p, label="owner=acme")
    expect_listed(p, [acme])
    search(p, label="line=1")
    p.locator("#devices-tenant").select_option("default")
    expect_listed(p, [press1, press2])
    search(p, label="site")
    expect(p.get_by_test_id("error")).to_be_visible()
    expect(p.get_by_test_id("error")).to_contain_text("NAME=VALUE")
    search(p, label="")
    expect(p.get_by_test_id("error")).to_be_hidden()
    expect_listed(p, [press1, press2, drill])
    p.locator("#devices-tenant").select_option(value="")
    expect_listed(p, everyone)

    # Presence: offline is a device seen and gone; one never connected is in neither list.
    p.locator("#devices-presence").select_option("offline")
    expect_listed(p, [drill])
    expect(p.locator(f'tr[data-device-id="{drill}"] [data-col=presence]')).to_have_text("offline")
    p.locator("#devices-presence").select_option("online")
    expect_listed(p, [])

    # A device that connects joins the online list, and leaves it when it goes, with no click (live).
    session = token_session(fleet.served.bridge.port, fleet.devices["press-001"].credentials.mqtt)
    try:
        expect_listed(p, [press1])
        expect(p.locator(f'tr[data-device-id="{press1}"] [data-col=presence]')).to_have_text("online")
    finally:
        session.close()
    expect_listed(p, [])
    assert wait_for(lambda: fleet.served.bridge.store.device(press1).online is False, timeout=30)
    p.locator("#devices-presence").select_option("offline")
    expect_listed(p, [press1, drill])
    p.locator("#devices-presence").select_option(value="")
    expect_listed(p, everyone)


def test_a_devices_detail_shows_its_hardware_network_labels_and_events(console: Console, ui: Page) -> None:
    p, fleet = ui, console.fleet
    press = fleet.devices["press-001"]
    p.locator(f'tr[data-device-id="{press.device_id}"]').click()
    expect(p.get_by_test_id("detail-id")).to_have_text(press.device_id)
    expect(p.get_by_test_id("detail-hardware-id")).to_have_text("press-001")
    expect(p.get_by_test_id("detail-tenant")).to_have_text("default")
    expect(p.locator("#detail-network")).to_contain_text(press.network.ip or "")
    assert fields_of(p, "detail-hardware") == {
        "board_model": "Raspberry Pi 4 Model B",
        "cpu_cores": "4",
        "ram_mb": str(press.hardware.ram_mb),
        "os": "Debian GNU/Linux 12",
        "arch": "aarch64",
        "kernel": str(press.hardware.kernel),
    }
    assert fields_of(p, "detail-network") == {
        "hostname": "press-001.plant",
        "ip": "10.20.0.11",
        "mac": "dc:a6:32:00:00:01",
        "connection_type": "ethernet",
    }
    assert fields_of(p, "detail-labels") == SITE_LYON
    stored = fleet.served.bridge.store.device(press.device_id)
    assert stored.labels == SITE_LYON and stored.hardware and stored.hardware["board_model"] == "Raspberry Pi 4 Model B"
    assert fields_of(p, "detail-fields")["agent version"] == str(stored.agent_version)
    events = p.get_by_test_id("detail-events")
    expect(events.locator('li[data-event="device.provisioned"]')).to_contain_text("key lyon-line")
    expect(events.locator("li")).to_have_count(len(fleet.served.bridge.store.events(device_id=press.device_id)))

    # Another device: the revoked one, its events newest first (the revocation, by the API's admin token).
    revoked = fleet.devices["press-002"]
    p.locator(f'tr[data-device-id="{revoked.device_id}"]').click()
    expect(p.get_by_test_id("detail-id")).to_have_text(revoked.device_id)
    expect(p.get_by_test_id("detail-status")).to_have_text("revoked")
    expect(events.locator("li").first).to_have_attribute("data-event", "device.revoked")
    expect(events.locator("li").first).to_contain_text("by api:adm_")
    expect(events.locator('li[data-event="device.provisioned"]')).to_have_count(1)
    expect(p.locator("#detail-network")).to_contain_text("10.20.0.12")
    expect(p.get_by_test_id("device-reinstate")).to_be_visible()
    expect(p.get_by_test_id("device-revoke")).to_be_hidden()

    # What a device reports is text, however it looks: its name in the list and the detail, its hostname.
    hostile = fleet.devices["drill-001"]
    row = p.locator(f'tr[data-device-id="{hostile.device_id}"]')
    expect(row.locator("[data-col=name]")).to_have_text(HOSTILE_DEVICE)
    row.click()
    expect(p.get_by_test_id("detail-name")).to_have_text(HOSTILE_DEVICE)
    expect(p.locator("#detail-network")).to_contain_text(HOSTILE_HOST)
    assert fields_of(p, "detail-network")["hostname"] == HOSTILE_HOST
    assert fields_of(p, "detail-labels") == {"site": "oslo"}
    expect(p.get_by_test_id("detail-presence")).to_have_text("offline")
    assert p.locator("#devices-table img, #device-detail img, #device-detail svg").count() == 0
    assert p.evaluate("() => window.__pwned") is None

    p.locator("#detail-close").click()
    expect(p.get_by_test_id("device-detail")).to_be_hidden()


def read_codes(p: Page) -> list[tuple[str, str]]:
    rows = p.get_by_test_id("code-row").evaluate_all(
        "rows => rows.map((row) => [...row.children].map((cell) => cell.textContent))"
    )
    return [(key_id, code) for key_id, code, _expires in rows]


def database_bytes(served: Served) -> bytes:
    """The database as it is on disk, its write-ahead log too: where a secret kept in the clear would be."""
    path = served.bridge.settings.database_file
    return b"".join(p.read_bytes() for p in (path, path.with_name(path.name + "-wal")) if p.exists())


def test_bulk_codes_as_csv_each_shown_once(console: Console, ui: Page) -> None:
    p, served = ui, console.fleet.served
    p.locator("#tab-keys").click()
    p.locator("#codes-name").fill("batch 7")
    p.locator("#codes-tenant").select_option("keys-t")
    p.locator("#codes-count").fill("3")
    p.locator("#codes-create-submit").click()
    expect(p.get_by_test_id("codes-secret")).to_be_visible()
    expect(p.get_by_test_id("code-row")).to_have_count(3)
    expect(p.locator("#codes-secret-count")).to_have_text("3 codes.")
    shown = read_codes(p)
    assert len({code for _, code in shown}) == 3
    assert all(re.fullmatch(r"PROV-[0-9A-Z]{4}-[0-9A-Z]{4}", code) for _, code in shown), shown

    # The same codes as a CSV file the browser downloads (made in the page: no request carries them).
    with p.expect_download() as downloading:
        p.get_by_test_id("codes-download").click()
    download = downloading.value
    assert download.suggested_filename == "codes-batch_7.csv"
    with open(download.path(), newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert table[0] == ["key_id", "code", "expires_at"]
    assert [(key_id, code) for key_id, code, _ in table[1:]] == shown

    # Each is a one-time code of keys-t, in the key list; the database holds none of them in the clear.
    for key_id, _ in shown:
        key = served.bridge.store.key(key_id)
        assert (key.kind, key.name, key.tenant_name, key.max_registrations) == ("code", "batch 7", "keys-t", 1)
        row = p.locator(f'tr[data-key-id="{key_id}"]')
        expect(row.locator("[data-col=kind]")).to_have_text("code")
        expect(row.locator("[data-col=registrations]")).to_have_text("0 / 1")
    made = key_events(served, "key.codes_created", "batch 7")
    assert len(made) == 1 and made[0]["count"] == 3 and made[0]["tenant"] == "keys-t", made
    kept = database_bytes(served)
    assert not any(code.encode() in kept for _, code in shown)
    assert not any(code in kept_by_the_page(p) for _, code in shown)

    # Shown once: gone when dismissed (the download link too), and nowhere after a reload.
    p.get_by_test_id("codes-secret-dismiss").click()
    expect(p.get_by_test_id("codes-secret")).to_be_hidden()
    expect(p.get_by_test_id("code-row")).to_have_count(0)
    expect(p.get_by_test_id("codes-download")).to_have_attribute("href", "#")
    assert not any(code in p.content() for _, code in shown)
    p.reload()
    p.locator("#tab-keys").click()
    expect(p.locator(f'tr[data-key-id="{shown[0][0]}"]')).to_be_visible()
    expect(p.get_by_test_id("codes-secret")).to_be_hidden()
    assert not any(code in p.content() or code in kept_by_the_page(p) for _, code in shown)
    assert not any(
        code in url or code in (body or "") for _, code in shown for _, url, body in console.watched.requests
    )


def key_events(served: Served, name: str, key_name: str) -> list[dict[str, Any]]:
    """The events `name` of the key `key_name`, each checked to name the dashboard's admin token as its actor."""
    found = [e for e in served.bridge.store.events(event=name, limit=1000) if e.get("key_name") == key_name]
    assert all(str(e["actor"]).startswith("api:adm_") for e in found), found
    return found


def claim_with(served: Served, key: str, hardware_id: str) -> ClaimOk | ClaimError:
    with Device(served.bridge, hardware_id) as device:
        return device.claim(key)


def test_a_keys_use_limit_changed_and_the_key_revoked_and_reinstated(console: Console, ui: Page) -> None:
    p, served = ui, console.fleet.served
    store = served.bridge.store
    p.locator("#tab-keys").click()
    p.locator("#key-tenant").select_option("keys-t")
    value = create_key(p, "limit-k", "5")
    p.get_by_test_id("key-secret-dismiss").click()
    row = p.get_by_test_id("key-row").filter(has_text="limit-k")
    key_id = str(row.get_attribute("data-key-id"))
    expect(row.locator("[data-col=tenant]")).to_have_text("keys-t")
    expect(row.locator("[data-col=registrations]")).to_have_text("0 / 5")

    # The use limit, edited in the row: the value it has, Cancel changes nothing, Save lowers it to 1.
    row.get_by_test_id("key-edit-max").click()
    expect(row.get_by_test_id("key-max-input")).to_have_value("5")
    row.get_by_role("button", name="Cancel").click()
    expect(row.get_by_test_id("key-max-input")).to_have_count(0)
    expect(row.locator("[data-col=registrations]")).to_have_text("0 / 5")
    row.get_by_test_id("key-edit-max").click()
    row.get_by_test_id("key-max-input").fill("1")
    row.get_by_role("button", name="Save").click()
    expect(row.locator("[data-col=registrations]")).to_have_text("0 / 1")
    expect(row.get_by_test_id("key-max-input")).to_have_count(0)
    assert store.key(key_id).max_registrations == 1
    updated = key_events(served, "key.updated", "limit-k")
    assert len(updated) == 1 and updated[0]["changes"] == ["max_registrations"], updated

    # The bridge holds to it: one device, then no more; the page, read again, counts the use.
    assert isinstance(claim_with(served, value, "kt-001"), ClaimOk)
    assert isinstance(claim_with(served, value, "kt-002"), ClaimError)
    p.locator("#tab-devices").click()
    p.locator("#tab-keys").click()
    expect(row.locator("[data-col=registrations]")).to_have_text("1 / 1")

    # Unlimited (an empty limit): the next device is taken.
    row.get_by_test_id("key-edit-max").click()
    expect(row.get_by_test_id("key-max-input")).to_have_value("1")
    row.get_by_test_id("key-max-input").fill("")
    row.get_by_role("button", name="Save").click()
    expect(row.locator("[data-col=registrations]")).to_have_text("1 / ∞")
    assert store.key(key_id).max_registrations is None
    assert isinstance(claim_with(served, value, "kt-002"), ClaimOk)

    # Revoked from its row: claims refused; reinstated: taken again. The page, the store and the events agree.
    row.get_by_test_id("key-revoke").click()
    expect(row.locator("[data-col=status]")).to_have_text("revoked")
    expect(row.get_by_test_id("key-reinstate")).to_be_visible()
    expect(row.get_by_test_id("key-revoke")).to_have_count(0)
    assert store.key(key_id).status == "revoked"
    assert isinstance(claim_with(served, value, "kt-003"), ClaimError)
    p.reload()
    p.locator("#tab-keys").click()
    expect(row.locator("[data-col=status]")).to_have_text("revoked")
    expect(row.locator("[data-col=registrations]")).to_have_text("2 / ∞")
    row.get_by_test_id("key-reinstate").click()
    expect(row.locator("[data-col=status]")).to_have_text("active")
    expect(row.get_by_test_id("key-revoke")).to_be_visible()
    assert store.key(key_id).status == "active"
    assert isinstance(claim_with(served, value, "kt-003"), ClaimOk)
    assert len(key_events(served, "key.updated", "limit-k")) == 2
    for name in ("key.revoked", "key.reinstated"):
        assert len(key_events(served, name, "limit-k")) == 1, name
    assert value not in kept_by_the_page(p) and value not in p.content()
    assert not any(value in url or value in (body or "") for _, url, body in console.watched.requests)


def allowlist_of(served: Served, tenant: str = "default") -> dict[str, AllowlistEntry]:
    page = allowlist.list_entries(served.bridge.store, tenant, None, allowlist.MAX_PAGE)
    assert page.next_cursor is None
    return {entry.hardware_id: entry for entry in page.entries}


def csv_file(text: str) -> FilePayload:
    return {"name": "entries.csv", "mimeType": "text/csv", "buffer": text.encode()}


def test_the_allowlist_add_and_csv_import_with_a_dry_run(console: Console, ui: Page) -> None:
    p, served = ui, console.fleet.served
    p.locator("#tab-allowlist").click()
    expect(p.locator("#allowlist-tenant")).to_have_value("default")
    rows = p.get_by_test_id("allowlist-row")

    # One entry, by hand: on the list, and in the store.
    p.locator("#allowlist-hardware-id").fill("gate-001")
    p.locator("#allowlist-name").fill("North gate")
    p.locator("#allowlist-add button[type=submit]").click()
    gate = p.locator('tr[data-hardware-id="gate-001"]')
    expect(gate.locator("[data-col=name]")).to_have_text("North gate")
    expect(gate.locator("[data-col=device_id]")).to_have_text("—")
    expect(gate.locator("[data-col=api_key_made]")).to_have_text("no")
    expect(p.get_by_test_id("allowlist-secret")).to_be_hidden()
    entry = allowlist_of(served)["gate-001"]
    assert (entry.name, entry.device_id, entry.api_key_hash) == ("North gate", None, None)

    # One with credentials: its device id and API key shown once; the store keeps the key's hash only.
    p.locator("#allowlist-hardware-id").fill("gate-002")
    p.locator("#allowlist-credentials").check()
    p.locator("#allowlist-add button[type=submit]").click()
    expect(p.get_by_test_id("allowlist-secret")).to_be_visible()
    credential = p.get_by_test_id("credential-row")
    expect(credential).to_have_count(1)
    hardware_id, device_id, api_key = credential.locator("td").all_text_contents()
    assert hardware_id == "gate-002" and device_id.startswith("dev_") and api_key.startswith("dk_"), api_key
    expect(p.locator('tr[data-hardware-id="gate-002"] [data-col=api_key_made]')).to_have_text("yes")
    expect(p.locator('tr[data-hardware-id="gate-002"] [data-col=device_id]')).to_have_text(device_id)
    entry = allowlist_of(served)["gate-002"]
    assert entry.device_id == device_id and entry.api_key_hash == identifiers.digest(api_key)
    assert api_key.encode() not in database_bytes(served) and api_key not in kept_by_the_page(p)
    p.locator("#allowlist-secret-dismiss").click()
    expect(p.get_by_test_id("allowlist-secret")).to_be_hidden()
    assert api_key not in p.content()
    p.locator("#allowlist-credentials").uncheck()
    expect(rows).to_have_count(2)

    # A file with problems, dry run: each bad line named with what is wrong, nothing imported.
    before = allowlist_of(served)
    events_before = served.bridge.store.count("events")
    bad = (
        "hardware_id,name,labels\n"
        "imp-001,Pump 1,site=lyon;line=2\n"
        "imp-002,Pump 2,broken\n"
        "gate-001,again,\n"
        "a/b,,\n"
        "imp-001,twice,\n"
    )
    p.locator("#import-file").set_input_files(csv_file(bad))
    expect(p.locator("#import-dry-run")).to_be_checked()
    p.locator("#allowlist-import button[type=submit]").click()
    shown = p.get_by_test_id("import-error")
    expect(shown).to_be_visible()
    expect(shown).to_contain_text("4 problem(s) in the file, nothing was imported")
    expect(shown).to_contain_text("line 3: label 'broken' must look like name=value")
    expect(shown).to_contain_text("line 4: hardware_id 'gate-001'")
    expect(shown).to_contain_text("line 5: hardware_id must be")
    expect(shown).to_contain_text("line 6: hardware_id 'imp-001' is on line 2 already")
    expect(p.get_by_test_id("import-result")).to_be_hidden()
    expect(rows).to_have_count(2)
    assert allowlist_of(served) == before

    # The same file for real: all or nothing, so nothing either.
    p.locator("#import-dry-run").uncheck()
    p.locator("#allowlist-import button[type=submit]").click()
    expect(shown).to_be_visible()
    expect(shown).to_contain_text("line 3: label 'broken' must look like name=value")
    assert allowlist_of(served) == before
    assert served.bridge.store.events(event="allowlist.imported") == []

    # A good file, dry run: valid, nothing written; then imported, on the list with its names and labels.
    good = "hardware_id,name,labels\nimp-001,Pump 1,site=lyon;line=2\nimp-002,Pump 2,\nimp-003,,zone=b\n"
    p.locator("#import-file").set_input_files(csv_file(good))
    p.locator("#import-dry-run").check()
    p.locator("#allowlist-import button[type=submit]").click()
    result = p.get_by_test_id("import-result")
    expect(result).to_have_text("Dry run: 3 entries are valid; nothing was written.")
    expect(shown).to_be_hidden()
    expect(rows).to_have_count(2)
    assert allowlist_of(served) == before
    assert served.bridge.store.count("events") == events_before

    p.locator("#import-dry-run").uncheck()
    p.locator("#allowlist-import button[type=submit]").click()
    expect(result).to_have_text("Imported 3 entries.")
    expect(rows).to_have_count(5)
    imported = p.locator('tr[data-hardware-id="imp-001"]')
    expect(imported.locator("[data-col=name]")).to_have_text("Pump 1")
    expect(imported.locator("[data-col=labels]")).to_have_text("site=lyon, line=2")
    expect(p.locator('tr[data-hardware-id="imp-003"] [data-col=labels]')).to_have_text("zone=b")
    expect(p.get_by_test_id("allowlist-secret")).to_be_hidden()  # no credentials asked for
    expect(p.locator("#import-file")).to_have_value("")
    now = allowlist_of(served)
    assert set(now) == set(before) | {"imp-001", "imp-002", "imp-003"}
    assert (now["imp-001"].name, now["imp-001"].labels) == ("Pump 1", {"site": "lyon", "line": "2"})
    assert (now["imp-002"].name, now["imp-002"].labels, now["imp-003"].name) == ("Pump 2", {}, None)
    done = served.bridge.store.events(event="allowlist.imported")
    assert len(done) == 1 and done[0]["count"] == 3 and str(done[0]["actor"]).startswith("api:adm_")

    # Another tenant's allowlist is its own.
    p.locator("#allowlist-tenant").select_option("acme")
    expect(rows).to_have_count(0)
    expect(p.locator("#allowlist-empty")).to_be_visible()
