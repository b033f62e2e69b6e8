"""Issue 5: `provbridge keys rotate` killed half-way. The CLI runs in a subprocess whose audit hook counts
every filesystem step it takes under the data dir (a file opened for writing or created, a rename, a
removal, a mode change) and sends itself SIGKILL at step N, for every N from the first step to the last:
a real kill at every step, of the shipped code, on real files. After each kill:

* the key ring loads, and `provbridge doctor` passes or names the one problem left in one line;
* the bridge starts (embedded broker, `serve`) on what the kill left and serves a claim, signed with the
  token key active on disk;
* every token issued before still verifies (jwks.json has its kid; the broker accepts it), and a device
  provisioned before every rotation, with the first cloud key, refreshes its token and re-claims;
* `keys rotate` run again completes, `doctor` then passes, and the key directory is as a completed
  rotation leaves it: no temporary file (they hold private keys), every key active or recorded as
  retired (so that retired token keys are pruned once their tokens have expired), jwks.json listing
  exactly the token keys on disk.

The token rotation runs with a token key due for pruning (retired two days ago), so its pruning steps
are killed too. Figures are logged as `FAULTS ...` lines, informational only.
"""

import json
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bridge.config import TOKEN_TTL_CAP_SECONDS, Settings
from bridge.ops import doctor
from bridge.storage import keyfiles, rotation
from bridge.storage.rotation import Kind, LiveKeyRing
from device_sim.device import DeviceIdentity, claim_over_mqtt, connect_with_token, refresh_over_mqtt
from provwire import crypto
from provwire.models import Credentials
from tests.helpers.bridge import serving
from tests.helpers.cli import config_toml, run_cli
from tests.helpers.figures import figure

TIMEOUT = 30.0  # generous: an exchange that takes longer is a failure, not slowness

# Run as `python -c KILLER DATA_DIR N provbridge-argv...`: the CLI, killed by SIGKILL at its Nth filesystem
# step under DATA_DIR (N = 0: never), each step reported on stderr first. A file opened for writing counts
# once it is open (created or truncated, nothing written yet: a kill at its first write); a rename, a removal
# or a mode change counts before it happens.
KILLER = r"""
import builtins, io, os, signal, sys

data_dir, target, steps = os.path.realpath(sys.argv[1]), int(sys.argv[2]), 0
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def step(what, *paths):
    global steps
    names = [os.path.realpath(os.fsdecode(p)) for p in paths if not isinstance(p, int)]
    if not names or not all(n.startswith(data_dir + os.sep) for n in names):
        return
    steps += 1
    print("STEP", steps, what, *(os.path.relpath(n, data_dir) for n in names), file=sys.stderr, flush=True)
    if steps == target:
        os.kill(os.getpid(), signal.SIGKILL)


def after_open(real, flags_of):
    def opened(path, *args, **kwargs):
        result = real(path, *args, **kwargs)
        if flags_of(*args, **kwargs):
            step("opened for writing", path)
        return result
    return opened


def before(real, what):
    def wrapped(*args, **kwargs):
        step(what, *[a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))])
        return real(*args, **kwargs)
    return wrapped


os.open = after_open(os.open, lambda flags, *a, **k: flags & WRITING)
io.open = builtins.open = after_open(io.open, lambda mode="r", *a, **k: bool(set(mode) & set("wax+")))
for name in ("replace", "rename", "remove", "unlink", "chmod"):
    setattr(os, name, before(getattr(os, name), name))

from bridge.cli.main import main

code = main(sys.argv[3:])
print("STEPS", steps, file=sys.stderr)
sys.exit(code)
"""


def rotate_killed_at(settings: Settings, kind: Kind, step: int) -> subprocess.CompletedProcess[str]:
    """`provbridge keys rotate --KIND` in a subprocess, killed at filesystem step `step` (0: never)."""
    data_dir = str(settings.data_dir)
    argv = [sys.executable, "-c", KILLER, data_dir, str(step), "--data-dir", data_dir, "keys", "rotate", f"--{kind}"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def _steps(stderr: str) -> list[str]:
    return [line.split(" ", 2)[2] for line in stderr.splitlines() if line.startswith("STEP ")]


def add_due_token_key(settings: Settings) -> str:
    """A retired token key whose tokens have all expired (retired two days ago): the next rotation prunes it."""
    data_dir = settings.data_dir
    kid = keyfiles.store_private_key(data_dir, "token", crypto.generate_private_key())
    doc = rotation.read_active(data_dir)
    doc["retired"]["token"][kid] = int(time.time()) - 2 * TOKEN_TTL_CAP_SECONDS
    keyfiles.write_public(keyfiles.keys_dir(data_dir) / "active.json", json.dumps(doc).encode())
    keyfiles.publish_public_keys(data_dir, keyfiles.load_keys(data_dir))
    return kid


def _kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def _jwks_kids(settings: Settings) -> set[str]:
    return {str(k["kid"]) for k in json.loads((settings.data_dir / "jwks.json").read_text())["keys"]}


def _published_cloud_key(settings: Settings) -> ec.EllipticCurvePublicKey:
    """What new firmware is given: cloud_public.pem."""
    key = serialization.load_pem_public_key((settings.data_dir / "cloud_public.pem").read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


@dataclass
class History:
    """What devices hold from before: the first device (first cloud key) and every token issued so far."""

    identity: DeviceIdentity
    device_id: str
    first_cloud: ec.EllipticCurvePublicKey
    tokens: list[Credentials] = field(default_factory=list)
    doctor_findings: dict[int, str] = field(default_factory=dict)


def _provision_first(settings: Settings, key: str) -> History:
    identity = DeviceIdentity.generate(f"hw-first-{uuid.uuid4().hex[:8]}")
    cloud = _published_cloud_key(settings)
    with serving(settings):
        first = claim_over_mqtt("127.0.0.1", settings.broker.port, identity, key, cloud, timeout=TIMEOUT)
    return History(identity, first.device_id, cloud, [first.credentials])


def check_after_kill(settings: Settings, key: str, kind: Kind, config: Path, history: History, step: int) -> None:
    data_dir, port = settings.data_dir, settings.broker.port
    keyfiles.load_keys(data_dir)  # the key ring loads ...
    LiveKeyRing(data_dir)  # ... as a starting bridge loads it
    published = _jwks_kids(settings)
    for issued in history.tokens:  # every token issued before is still published (kid first: never print a token)
        kid = _kid(issued.mqtt.token)
        assert kid in published, (step, issued.mqtt.client_id, kid)
    with serving(settings):  # the bridge starts on what the kill left
        report = doctor.run_checks(config, data_dir)
        if not report.ok:  # one problem, named in one line, and true of the files
            assert [c.name for c in report.failed] == ["active keys"], [c.line() for c in report.failed]
            line = report.failed[0].line()
            assert "cloud_public.pem is not the active cloud key" in line, line
            assert crypto.key_id(_published_cloud_key(settings)) != keyfiles.load_keys(data_dir).active_cloud
            history.doctor_findings[step] = line
        history.tokens.append(claim_new_device(settings, key, f"{step}"))
        # Tokens issued before connect: the first one, and the one issued before this kill.
        for issued in (history.tokens[0], history.tokens[-2]):
            connect_with_token("127.0.0.1", port, issued, timeout=TIMEOUT)
        # The first device, provisioned with the first cloud key, refreshes and re-claims with it.
        first_kid = crypto.key_id(history.first_cloud)
        refreshed = refresh_over_mqtt(
            "127.0.0.1", port, history.identity, history.device_id, history.first_cloud, timeout=TIMEOUT
        )
        assert refreshed.cloud_key_id == first_kid
        connect_with_token("127.0.0.1", port, refreshed.credentials, timeout=TIMEOUT)
        again = claim_over_mqtt("127.0.0.1", port, history.identity, key, history.first_cloud, timeout=TIMEOUT)
        assert (again.device_id, again.created, again.cloud_key_id) == (history.device_id, False, first_kid)

        # Run again, the rotation completes, under the running bridge, which follows it.
        assert run_cli(settings, "keys", "rotate", f"--{kind}") == 0
        report = doctor.run_checks(config, data_dir)
        assert report.ok, [c.line() for c in report.failed]
        history.tokens.append(claim_new_device(settings, key, f"{step}-again"))
    # As a completed rotation leaves the key directory: no temporary file, every key accounted for.
    leftovers = sorted(p.name for p in keyfiles.keys_dir(data_dir).iterdir() if p.name.endswith(".tmp"))
    assert leftovers == [], (step, leftovers)
    unaccounted = [(k.kind, k.kid) for k in rotation.key_status(data_dir) if k.status == "retired" and not k.retired_at]
    assert unaccounted == [], (step, unaccounted)
    assert _jwks_kids(settings) == set(keyfiles.load_keys(data_dir).token), step


def claim_new_device(settings: Settings, key: str, tag: str) -> Credentials:
    """A new device, with the firmware's cloud key (cloud_public.pem), is served; its token is signed with
    the token key active on disk."""
    identity = DeviceIdentity.generate(f"hw-{tag}-{uuid.uuid4().hex[:8]}")
    new = claim_over_mqtt(
        "127.0.0.1", settings.broker.port, identity, key, _published_cloud_key(settings), timeout=TIMEOUT
    )
    kid = _kid(new.credentials.mqtt.token)
    assert kid == keyfiles.load_keys(settings.data_dir).active_token, kid
    return new.credentials


def _kill_at_every_step(initialised: tuple[Settings, str], kind: Kind) -> None:
    settings, key = initialised
    config = settings.data_dir.parent / "doctor.toml"
    config.write_text(config_toml(settings))
    history = _provision_first(settings, key)
    prune = kind == "token"
    if prune:
        add_due_token_key(settings)
    dry = rotate_killed_at(settings, kind, 0)  # never killed: how many steps a rotation takes
    assert dry.returncode == 0, dry.stderr
    steps = _steps(dry.stderr)
    assert any(s.startswith("unlink") for s in steps) == prune, steps  # the pruning steps are there
    started = time.monotonic()
    for step in range(1, len(steps) + 1):
        if prune:
            add_due_token_key(settings)
        killed = rotate_killed_at(settings, kind, step)
        assert killed.returncode == -signal.SIGKILL, (step, killed.returncode, killed.stderr)
        taken = _steps(killed.stderr)  # the same steps as the run never killed, up to this one
        assert [t.split()[0] for t in taken] == [t.split()[0] for t in steps[:step]], (step, taken)
        check_after_kill(settings, key, kind, config, history, step)
    figure(
        f"rotation-killed-{kind}",
        steps=len(steps),
        kills=len(steps),
        doctor_findings_at_steps=",".join(map(str, history.doctor_findings)) or "none",
        tokens_checked=len(history.tokens),
        seconds=f"{time.monotonic() - started:.1f}",
    )
    for step, line in history.doctor_findings.items():
        print(f"FAULTS rotation-killed-{kind} step {step} ({steps[step - 1]}): doctor: {line}")


def test_token_key_rotation_killed_at_every_step(initialised: tuple[Settings, str]) -> None:
    _kill_at_every_step(initialised, "token")


def test_cloud_key_rotation_killed_at_every_step(initialised: tuple[Settings, str]) -> None:
    _kill_at_every_step(initialised, "cloud")
