"""Issue 12: the operator dashboard (/ui/) in a real headless Chromium (Debian's `chromium`, driven by Playwright;
no browser is downloaded), against a real `provbridge serve` with the embedded broker: log in with an admin token,
create a key and see its value once, see a device provisioned with it appear live with its presence (the server's
event stream, no click or reload), revoke it from its detail panel; a hostile key name renders as text.

Chromium is installed by `make test` (`make chromium`, bridge/api/install-chromium.sh); without it the test is
skipped, except under CI, where it fails (as the Mosquitto tests do).
"""

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, expect, sync_playwright

from bridge.config import Settings
from tests.helpers.api import Api, serve_with_api
from tests.helpers.bridge import Bridge
from tests.helpers.devices import claim_devices
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
    errors: list[str] = field(default_factory=list)
    csp: list[str] = field(default_factory=list)

    def on_request(self, request: Request) -> None:
        self.requests.append((request.method, request.url, request.post_data))

    def on_console(self, message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            self.csp.append(message.text)


@pytest.fixture
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
