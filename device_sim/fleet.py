"""Provision a simulated fleet: each device claims, stores its vault, connects; on a bounded thread pool."""

import math
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from device_sim import hostinfo
from device_sim.device import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TIMEOUT_S,
    DeviceIdentity,
    claim_over_mqtt,
    connect_with_credentials,
    device_state_dir,
    merge_reclaim,
    refresh_over_mqtt,
)
from device_sim.errors import ClaimRejected, ClaimTimeout, ConnectError
from device_sim.vault import Vault, ensure_private_dir
from provwire import topics
from provwire.errors import ProvbridgeError
from provwire.models import Hardware, Network


@dataclass(frozen=True)
class FleetConfig:
    host: str
    port: int
    provision_key: str = field(repr=False)  # "" with `refresh`: only devices holding credentials can run
    cloud_public_key: ec.EllipticCurvePublicKey = field(repr=False)
    state_dir: Path
    prefix: str = topics.DEFAULT_PREFIX
    timeout: float = DEFAULT_TIMEOUT_S
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    hardware_id_prefix: str | None = None  # None: sim-<host fingerprint>-
    first_index: int = 1
    hardware: Hardware | None = None
    network: Network | None = None
    claim_username: str | None = None  # None: claim anonymously
    tls: bool = False  # TLS for the claim connection; the token connection follows credentials.mqtt.tls
    ca_file: Path | None = None
    # Devices holding credentials from an earlier run renew their token (or certificate) over the token
    # topic (needs the cloud key they claimed with) instead of re-claiming; the others claim.
    refresh: bool = False
    # Claims carry a CSR, for a provisioning key that issues certificates (PROTOCOL.md section 10.4). What a
    # refresh renews follows what the device holds, whatever this says.
    certificate: bool = False
    # Where devices holding a certificate connect (the broker's certificate listener, always TLS); None: the
    # port their credentials name. Token devices connect to `port`.
    certificate_port: int | None = None


@dataclass
class DeviceOutcome:
    """What happened to one device. Holds no secret: safe to print and to serialise."""

    index: int
    hardware_id: str
    ok: bool = False
    status: str = "pending"  # "connected", or a short failure label for the table
    error: str | None = None  # the full reason of a failure
    device_id: str | None = None
    created: bool | None = None
    refreshed: bool = False  # got its token (or certificate) by a token refresh, not a claim
    credential: str | None = None  # "token" or "certificate", once it has credentials
    latency_ms: float | None = None
    attempts: int = 0
    topic: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "hardware_id": self.hardware_id,
            "ok": self.ok,
            "status": self.status,
            "error": self.error,
            "device_id": self.device_id,
            "created": self.created,
            "refreshed": self.refreshed,
            "credential": self.credential,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 3),
            "attempts": self.attempts,
            "topic": self.topic,
        }


def provision_device(config: FleetConfig, index: int, cancel: threading.Event | None = None) -> DeviceOutcome:
    """Run one device end to end. Never raises for a protocol or network failure: it is recorded instead."""
    hardware_id = hostinfo.simulated_hardware_id(index, config.hardware_id_prefix)
    outcome = DeviceOutcome(index=index, hardware_id=hardware_id)
    stage = "identity"
    try:
        identity = DeviceIdentity.load_or_create(device_state_dir(config.state_dir, hardware_id), hardware_id)
        assert identity.state_dir is not None  # load_or_create always sets it
        vault = Vault(identity.state_dir)
        stored = vault.load() if config.refresh else None
        if stored is not None:
            stage = "refresh"
            result = refresh_over_mqtt(
                config.host,
                config.port,
                identity,
                stored.mqtt.client_id,  # the device id
                config.cloud_public_key,
                prefix=config.prefix,
                timeout=config.timeout,
                max_attempts=config.max_attempts,
                username=config.claim_username,
                tls=config.tls,
                ca_file=config.ca_file,
                cancel=cancel,
                certificate=stored.mqtt.certificate is not None,  # renew what the device holds
            )
            outcome.refreshed = True
        else:
            stage = "claim"
            if not config.provision_key:
                return _failed(outcome, "claim failed", "no stored credentials to refresh and no provisioning key")
            result = claim_over_mqtt(
                config.host,
                config.port,
                identity,
                config.provision_key,
                config.cloud_public_key,
                prefix=config.prefix,
                timeout=config.timeout,
                max_attempts=config.max_attempts,
                hardware=config.hardware,
                network=config.network,
                username=config.claim_username,
                tls=config.tls,
                ca_file=config.ca_file,
                cancel=cancel,
                certificate=config.certificate,
            )
        outcome.device_id = result.device_id
        outcome.created = result.created
        outcome.attempts = result.attempts
        outcome.latency_ms = None if result.latency_s is None else result.latency_s * 1000.0
        mqtt_creds = result.credentials.mqtt
        certificate = mqtt_creds.certificate is not None
        outcome.credential = "certificate" if certificate else "token"
        stage = "vault"
        vault.store(merge_reclaim(stored or vault.load(), result.credentials))
        stage = "connect"
        outcome.topic = connect_with_credentials(
            config.host,
            (config.certificate_port or mqtt_creds.port) if certificate else config.port,
            result.credentials,
            config.timeout,
            ca_file=config.ca_file,
            private_key=identity.private_key,
            files_dir=identity.state_dir,
            cancel=cancel,
        )
    except ClaimRejected as exc:
        # A CSR refused (missing, or not wanted) means the key issues the other credential type: worth a hint.
        csr = any(name == "csr" for name, _ in exc.field_errors)
        return _failed(outcome, f"rejected: {exc.code}" + (" (csr)" if csr else ""), str(exc))
    except ClaimTimeout as exc:
        return _failed(outcome, "claim timeout", str(exc))
    except ConnectError as exc:
        return _failed(outcome, f"{stage}: connect failed", str(exc))
    except ProvbridgeError as exc:
        return _failed(outcome, f"{stage} failed", f"{type(exc).__name__}: {exc}")
    except ValidationError as exc:
        # Never str(exc): pydantic echoes input values, and the claim's input includes the provision key.
        first = exc.errors(include_input=False)[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _failed(outcome, f"{stage} failed", f"invalid {where}: {first.get('msg')}")
    except (OSError, ValueError) as exc:
        return _failed(outcome, f"{stage} failed", f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        # A bug here or in a library must cost one device, not the whole fleet run.
        return _failed(outcome, f"{stage} failed", f"unexpected {type(exc).__name__}: {exc}")
    outcome.ok = True
    outcome.status = "connected"
    return outcome


def _failed(outcome: DeviceOutcome, status: str, error: str) -> DeviceOutcome:
    outcome.ok = False
    outcome.status = status
    outcome.error = error
    return outcome


def run_fleet(
    config: FleetConfig,
    count: int,
    concurrency: int,
    on_done: Callable[[DeviceOutcome], None] | None = None,
) -> list[DeviceOutcome]:
    """Provision `count` devices, at most `concurrency` at a time; outcomes in device order.

    `on_done` is called once per finished device, from the calling thread (progress display).
    On KeyboardInterrupt, running devices stop at their next wait (within ~50 ms), queued ones
    never start, and the interrupt propagates.
    """
    indices = range(config.first_index, config.first_index + count)
    outcomes: dict[int, DeviceOutcome] = {}
    ensure_private_dir(config.state_dir)  # it will hold every device's private key
    cancel = threading.Event()
    pool = ThreadPoolExecutor(max_workers=max(1, min(concurrency, count)), thread_name_prefix="sim-device")
    try:
        futures = [pool.submit(provision_device, config, i, cancel) for i in indices]
        for future in as_completed(futures):
            outcome = future.result()
            outcomes[outcome.index] = outcome
            if on_done is not None:
                on_done(outcome)
    except BaseException:
        # Interrupted: drop the devices not started and stop the running ones at their next wait.
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return [outcomes[i] for i in indices]


# --- summary --------------------------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile (no interpolation: every reported latency is one a device really had)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Summary:
    devices: int
    succeeded: int
    failed: int
    created: int
    p50_ms: float | None
    p95_ms: float | None
    max_ms: float | None
    elapsed_s: float
    failures: dict[str, int]

    @property
    def all_ok(self) -> bool:
        return self.devices > 0 and self.failed == 0

    def as_dict(self) -> dict[str, Any]:
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        return {
            "ok": self.all_ok,
            "devices": self.devices,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "created": self.created,
            "latency_ms": {"p50": ms(self.p50_ms), "p95": ms(self.p95_ms), "max": ms(self.max_ms)},
            "elapsed_s": round(self.elapsed_s, 3),
            "failures": self.failures,
        }


def summarise(outcomes: list[DeviceOutcome], elapsed_s: float) -> Summary:
    latencies = [o.latency_ms for o in outcomes if o.ok and o.latency_ms is not None]
    return Summary(
        devices=len(outcomes),
        succeeded=sum(o.ok for o in outcomes),
        failed=sum(not o.ok for o in outcomes),
        created=sum(bool(o.ok and o.created) for o in outcomes),
        p50_ms=percentile(latencies, 50),
        p95_ms=percentile(latencies, 95),
        max_ms=max(latencies) if latencies else None,
        elapsed_s=elapsed_s,
        failures=dict(Counter(o.status for o in outcomes if not o.ok).most_common()),
    )
