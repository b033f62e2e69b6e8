"""The JWKS over HTTP for brokers that fetch one (EMQX: docs/SCALING.md "EMQX"): `GET /.well-known/jwks.json` on the
admin API, public, cacheable, always what `provbridge jwks` prints, and each token key in it before it signs a
token (bridge/storage/rotation.py: the next key is published a rotation ahead)."""

import json
import time
from collections.abc import Iterator

import jwt
import pytest

from bridge.config import Settings
from bridge.storage import rotation
from provwire.models import ClaimOk
from tests.helpers.api import Api, api_server
from tests.helpers.bridge import Bridge
from tests.helpers.cli import cli_run
from tests.helpers.devices import Device

PATH = "/.well-known/jwks.json"


@pytest.fixture
def api(bridge: Bridge) -> Iterator[Api]:
    with api_server(bridge.settings) as running:
        yield running


def _cli_jwks(capsys: pytest.CaptureFixture[str], settings: Settings) -> object:
    code, out, err = cli_run(capsys, settings, "jwks")
    assert code == 0, err
    return json.loads(out)


def _token_of(bridge: Bridge) -> str:
    with Device(bridge) as device:
        answer = device.claim(bridge.provision_key)
        assert isinstance(answer, ClaimOk)
        return device.open(answer).mqtt.token


def test_the_served_jwks_is_the_cli_s_is_public_and_says_how_long_to_cache_it(
    bridge: Bridge, api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    served = api.request("GET", PATH)  # no token
    assert served.status == 200 and served.headers["content-type"] == "application/json"
    assert served.json() == _cli_jwks(capsys, bridge.settings)
    assert served.headers["cache-control"] == f"public, max-age={bridge.settings.token.jwks_max_age_seconds}"
    assert all(set(key) <= {"kty", "crv", "x", "y", "kid", "alg", "use"} for key in served.json()["keys"])  # no "d"
    etag = served.headers["etag"]
    again = api.request("GET", PATH, headers={"If-None-Match": etag})
    assert (again.status, again.body, again.headers["etag"]) == (304, b"", etag)  # unchanged: nothing to fetch
    other = api.request("GET", "/v1/jwks")  # the admin route beside it still needs a token
    assert other.status == 401


def test_a_rotated_key_is_served_before_any_token_it_signs(
    bridge: Bridge, api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    before = api.request("GET", PATH)
    old_token = _token_of(bridge)
    code, out, err = cli_run(capsys, bridge.settings, "keys", "rotate", "--token", "--json")
    assert code == 0, err
    done = json.loads(out)
    new_token = _token_of(bridge)  # the running bridge signs with the new key from its next claim
    assert jwt.get_unverified_header(new_token)["kid"] == done["new_kid"] != done["old_kid"]
    # A verifier that fetched the JWKS before the rotation, and cached it, verifies the new key's tokens ...
    cached = {key["kid"]: key for key in before.json()["keys"]}
    assert done["new_kid"] in cached
    verified = jwt.decode(
        new_token,
        jwt.PyJWK(cached[done["new_kid"]]).key,
        algorithms=["ES256"],
        audience=bridge.settings.token.audience,
    )
    assert verified["exp"] > time.time()
    # ... and the one fetched after it: the old key's tokens and the new one's, and the next key already.
    after = api.request("GET", PATH, headers={"If-None-Match": before.headers["etag"]})
    assert after.status == 200 and after.headers["etag"] != before.headers["etag"]  # it changed: fetched anew
    assert after.json() == _cli_jwks(capsys, bridge.settings)
    kids = {key["kid"] for key in after.json()["keys"]}
    assert {jwt.get_unverified_header(old_token)["kid"], done["new_kid"], done["next_kid"]} <= kids
    assert rotation.read_active(bridge.settings.data_dir)["next_token"] == done["next_kid"]


def test_a_data_dir_made_before_the_next_key_gets_one_and_a_warning_at_its_first_rotation(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = bridge.settings.data_dir
    doc = rotation.read_active(data_dir)
    unannounced = doc.pop("next_token")
    del doc["next_published_at"]
    (data_dir / "keys" / f"token-{unannounced}.pem").unlink()
    (data_dir / "keys" / "active.json").write_text(json.dumps(doc))  # as an older release left it
    code, out, err = cli_run(capsys, bridge.settings, "keys", "rotate", "--token")
    assert code == 0, err
    assert "warning" in out and "made now" in out and "jwks_max_age_seconds" in out
    doc = rotation.read_active(data_dir)
    assert doc["next_token"] not in (doc["token"], unannounced)  # the next rotation's key, published from now
