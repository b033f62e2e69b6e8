"""Issue 12, admin API tokens through the CLI as an operator runs it (`provbridge admin-token create|list|revoke`,
in this process), used against the real admin API over HTTP (uvicorn on a loopback port) on the same data dir:
a token is shown once and stored only as its hash; it works until revoked, then gets 401 in the API's error shape;
its scopes and its tenant bound what it may do."""

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bridge.config import Settings
from bridge.storage.store import Store
from tests.helpers.api import Api, Response, api_server
from tests.helpers.cli import cli_json, cli_run
from tests.helpers.devices import claim_devices

TOKEN_RE = re.compile(r"pba_[A-Za-z0-9_-]{43}")


@dataclass(frozen=True)
class Host:
    settings: Settings
    store: Store
    api: Api
    device_id: str  # a device of the default tenant, made by a real claim


@pytest.fixture
def host(initialised: tuple[Settings, str]) -> Iterator[Host]:
    settings, key = initialised
    store = Store(settings.database)
    (device_id,) = claim_devices(settings, store, key, 1)
    try:
        with api_server(settings) as api:
            yield Host(settings, store, api, device_id)
    finally:
        store.close()


def create(capsys: pytest.CaptureFixture[str], settings: Settings, name: str, *argv: str) -> tuple[str, str]:
    """`admin-token create` as an operator reads it (text): the token's id and the value it shows once."""
    code, out, err = cli_run(capsys, settings, "admin-token", "create", "--name", name, *argv)
    assert code == 0, err
    (raw,) = TOKEN_RE.findall(out)
    (token_id,) = re.findall(r"created admin token (adm_[0-9a-f]{16}) ", out)
    return token_id, raw


def assert_error(answer: Response, status: int, code: str) -> None:
    assert (answer.status, answer.error_code) == (status, code), answer
    assert set(answer.json()) == {"error"} and set(answer.json()["error"]) == {"code", "message"}, answer


def key_names(store: Store) -> set[str]:
    stored = store.keys()
    return {key.name for key in stored}


def listed(capsys: pytest.CaptureFixture[str], settings: Settings) -> dict[str, dict[str, Any]]:
    return {token["id"]: token for token in cli_json(capsys, settings, "admin-token", "list")}


def test_a_token_is_shown_once_works_until_revoked_and_then_gets_401(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, api = host.settings, host.api
    token_id, raw = create(capsys, settings, "ops-console", "--scope", "write")
    assert raw.encode() not in settings.database_file.read_bytes()  # only its SHA-256 is kept

    # Listed by id and name, never by value, in text or JSON.
    code, text, _ = cli_run(capsys, settings, "admin-token", "list")
    assert code == 0 and token_id in text and "ops-console" in text and "pba_" not in text
    shown = listed(capsys, settings)[token_id]
    assert shown == {
        "id": token_id,
        "name": "ops-console",
        "scopes": ["write"],
        "tenant": None,
        "created_at": shown["created_at"],
        "revoked_at": None,
    }
    assert abs(shown["created_at"] - time.time()) < 3600

    # It works against the API: a read, and a change whose event names it.
    page = api.request("GET", "/v1/devices", raw)
    assert page.status == 200 and [d["id"] for d in page.json()["devices"]] == [host.device_id]
    made = api.request("POST", "/v1/keys", raw, {"name": "from-the-console"})
    assert made.status == 201, made
    (event,) = [e for e in host.store.events(event="key.created") if e["key_name"] == "from-the-console"]
    assert event["actor"] == f"api:{token_id}"

    revoked = cli_json(capsys, settings, "admin-token", "revoke", token_id)
    assert revoked["id"] == token_id and revoked["revoked_at"] is not None and "token" not in revoked
    for method, path, body in [("GET", "/v1/devices", None), ("POST", "/v1/keys", {"name": "too-late"})]:
        answer = api.request(method, path, raw, body)
        assert_error(answer, 401, "unauthorized")
        assert answer.headers.get("www-authenticate") == "Bearer"
    assert "too-late" not in key_names(host.store)
    assert listed(capsys, settings)[token_id]["revoked_at"] == revoked["revoked_at"]
    assert [e["actor"] for e in host.store.events(event="admin_token.created")] == ["cli"]
    assert [e["actor"] for e in host.store.events(event="admin_token.revoked")] == ["cli"]

    # Revoking again keeps the first revocation's time; an unknown id is named.
    again = cli_json(capsys, settings, "admin-token", "revoke", token_id)
    assert again["revoked_at"] == revoked["revoked_at"]
    # Revoking again changed nothing, so it is no new event either.
    assert [e["actor"] for e in host.store.events(event="admin_token.revoked")] == ["cli"]
    code, out, err = cli_run(capsys, settings, "admin-token", "revoke", "adm_0000000000000000")
    assert code == 1 and out == "" and "no admin token 'adm_0000000000000000'" in err


def test_the_json_output_shows_the_value_once_too(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    made = cli_json(capsys, host.settings, "admin-token", "create", "--name", "script", "--scope", "read")
    assert TOKEN_RE.fullmatch(made["token"]) and made["id"].startswith("adm_")
    assert host.api.request("GET", "/v1/devices", made["token"]).status == 200
    code, out, _ = cli_run(capsys, host.settings, "admin-token", "list", "--json")
    assert code == 0 and made["id"] in out and made["token"] not in out and "pba_" not in out


def test_scopes_bound_what_a_token_may_do(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    settings, api = host.settings, host.api
    _, read = create(capsys, settings, "dashboard-ro", "--scope", "read")
    _, backend = create(capsys, settings, "acme-backend", "--scope", "backend")
    _, both = create(capsys, settings, "ops", "--scope", "write", "--scope", "backend")
    device = f"/v1/devices/{host.device_id}"

    assert api.request("GET", device, read).status == 200
    assert api.request("GET", "/metrics", read).status == 200
    assert_error(api.request("POST", "/v1/keys", read, {"name": "nope"}), 403, "forbidden")
    assert_error(api.request("PATCH", device, read, {"name": "nope"}), 403, "forbidden")
    assert_error(api.request("GET", "/v1/backend/cloud-key", read), 403, "forbidden")

    assert api.request("GET", "/v1/backend/cloud-key", backend).status == 200
    assert_error(api.request("GET", device, backend), 403, "forbidden")
    assert_error(api.request("POST", "/v1/keys", backend, {"name": "nope"}), 403, "forbidden")

    assert api.request("PATCH", device, both, {"name": "pump 7"}).status == 200
    assert api.request("GET", "/v1/backend/cloud-key", both).status == 200
    assert host.store.device(host.device_id).name == "pump 7"
    assert "nope" not in key_names(host.store)  # nothing the refusals asked for happened

    code, out, err = cli_run(capsys, settings, "admin-token", "create", "--name", "x", "--scope", "admin")
    assert code == 2 and out == "" and "invalid choice" in err
    code, out, err = cli_run(capsys, settings, "admin-token", "create", "--name", "x")
    assert code == 2 and out == "" and "--scope" in err


def test_a_tenant_token_sees_and_changes_its_own_tenant_only(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    settings, api = host.settings, host.api
    acme = cli_json(capsys, settings, "tenant", "create", "acme")
    token_id, raw = create(capsys, settings, "acme-ops", "--scope", "write", "--tenant", "acme")
    assert listed(capsys, settings)[token_id]["tenant"] == "acme"
    assert "acme" in cli_run(capsys, settings, "admin-token", "list")[1]

    # The default tenant's device and key do not exist for it.
    assert api.request("GET", "/v1/devices", raw).json()["devices"] == []
    assert_error(api.request("GET", f"/v1/devices/{host.device_id}", raw), 404, "not_found")
    assert_error(api.request("PATCH", f"/v1/devices/{host.device_id}", raw, {"name": "mine"}), 404, "not_found")
    assert_error(api.request("GET", "/v1/devices?tenant=default", raw), 404, "not_found")
    assert [k["tenant"] for k in api.request("GET", "/v1/keys", raw).json()["keys"]] == ["acme"]
    assert [t["name"] for t in api.request("GET", "/v1/tenants", raw).json()["tenants"]] == ["acme"]
    assert_error(api.request("POST", "/v1/keys", raw, {"name": "x", "tenant": "default"}), 404, "not_found")
    assert_error(api.request("POST", "/v1/tenants", raw, {"name": "globex"}), 403, "forbidden")
    assert host.store.device(host.device_id).name is None

    # Its own tenant it changes: a key made without naming a tenant is acme's.
    made = api.request("POST", "/v1/keys", raw, {"name": "line-9"})
    assert made.status == 201 and made.json()["tenant"] == "acme"
    assert api.request("GET", f"/v1/keys/{acme['default_key']['id']}", raw).status == 200

    code, out, err = cli_run(
        capsys, settings, "admin-token", "create", "--name", "x", "--scope", "read", "--tenant", "globex"
    )
    assert code == 1 and out == "" and "globex" in err
    assert "x" not in {t["name"] for t in listed(capsys, settings).values()}  # nothing made
