"""Settings: built-in defaults < config file < PROVBRIDGE_* environment variables.

The config file is `--config PATH`, else `config/provbridge.toml` when it exists in the working
directory. Nested settings take a double underscore in the environment: PROVBRIDGE_BROKER__PORT=1884.
"""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from bridge.errors import ConfigError, UnscopableFilter
from bridge.rabbitmq_scopes import filter_pattern
from provwire import topics
from provwire.models import MAX_CLAIM_BYTES

DEFAULT_CONFIG_FILE = Path("config/provbridge.toml")
TOKEN_TTL_CAP_SECONDS = 86_400
# A claim of MAX_CLAIM_BYTES plus room for its topic, the packet's headers and MQTT 5 properties
# (Response Topic, Correlation Data).
PACKET_HEADROOM_BYTES = 4096
DEFAULT_MAX_PACKET_BYTES = MAX_CLAIM_BYTES + PACKET_HEADROOM_BYTES
MQTT_MAX_PACKET_BYTES = 268_435_460  # 1 type byte + 4 remaining-length bytes + 268,435,455
MAX_CLIENT_ID_LENGTH = 64  # provwire.topics.CLIENT_ID_RE


def claim_packet_bytes(prefix: str) -> int:
    """The size of the largest valid MQTT 3.1.1 claim packet: a MAX_CLAIM_BYTES payload on a 64-character
    client id's claim topic, QoS 1."""
    topic = len(topics.claim_topic(prefix, "x" * MAX_CLIENT_ID_LENGTH).encode("utf-8"))
    remaining = 2 + topic + 2 + MAX_CLAIM_BYTES  # topic length, topic, packet id, payload
    return 1 + len(_varint(remaining)) + remaining


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


class BrokerSettings(BaseModel):
    # "external": Mosquitto (bridge/mosquitto); "rabbitmq": a RabbitMQ cluster (bridge/rabbitmq, [rabbitmq] below).
    # On an external broker `host` and `port` are its MQTT listener, which devices are told (unless advertise_*).
    mode: Literal["embedded", "external", "rabbitmq"] = "embedded"
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    tls: bool = False  # the bridge's own connection; devices follow tls_listen (bridge/tls/certificates.py)
    ca_file: Path | None = None  # default: <data_dir>/tls/ca.pem when it exists
    # The broker's TLS listener: "auto" = when <data_dir>/tls/server.pem and server.key exist.
    tls_port: int = Field(default=8883, ge=1, le=65535)
    tls_listen: Literal["auto", "on", "off"] = "auto"
    plain_listen: bool = True  # embedded broker: false = TLS only
    # The listener for devices with a client certificate of the device CA (<data_dir>/tls/device-ca.pem),
    # with the server certificate of the TLS listener: "auto" = when that TLS listener is on and the device
    # CA exists (bridge/tls/certificates.py `certificate_listener_enabled`).
    certificate_port: int = Field(default=8884, ge=1, le=65535)
    certificate_listen: Literal["auto", "on", "off"] = "auto"
    username: str = "provbridge-bridge"
    password_file: Path | None = None  # default: <data_dir>/bridge.secret
    client_id: str = "provbridge-bridge"
    # Mosquitto, bridges on several hosts: each host but one sets its own (it joins the bridge's client ids, so the
    # hosts' sessions are apart); the host without one publishes the retained status. With it, set
    # claims.fleet_processes to the processes of all hosts: the claims are then taken on shared subscriptions.
    host_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_]{1,16}$")
    keepalive: int = Field(default=30, ge=5)
    allow_anonymous_provisioning: bool = True
    # What devices are told to connect to, when it differs from what the bridge uses (NAT, DNS name).
    advertise_host: str | None = None
    advertise_port: int | None = Field(default=None, ge=1, le=65535)
    # The bridge's own MQTT version. With "5" it answers a claim's Response Topic + Correlation Data.
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    # External mode: mirror each device token into Mosquitto's dynamic-security plugin (bridge/mosquitto/dynsec.py).
    dynsec: bool = True
    # Who verifies device tokens on Mosquitto: "jwt" = the provbridge_jwt plugin verifies them itself
    # (bridge/mosquitto/jwt), nothing is mirrored; "dynsec" = the bridge mirrors each one into dynamic
    # security, an opt-in for small fleets: Mosquitto rewrites its whole state file per token, so each
    # claim costs it time proportional to the devices holding a token (MIRRORED_FLEET_WARNING).
    mosquitto_auth: Literal["dynsec", "jwt"] = "jwt"
    dynsec_timeout_seconds: float = Field(default=10.0, gt=0)
    # How often expired device tokens are removed from Mosquitto (the granularity of expiry there).
    dynsec_janitor_seconds: float = Field(default=30.0, gt=0)
    # With claims.processes > 1: the shared-subscription group, `$share/<group>/<prefix>/claim/+`.
    share_group: str = Field(default="provbridge", pattern=r"^[^/+#\s]+$")
    # External Mosquitto: `max_packet_size`, the largest MQTT packet any client may send (else it is
    # disconnected). Mosquitto's default is no limit (256 MB, before authentication). It bounds devices'
    # own messages too: raise it when they publish more than ~20 KiB.
    max_packet_bytes: int = Field(default=DEFAULT_MAX_PACKET_BYTES, le=MQTT_MAX_PACKET_BYTES)


class TokenSettings(BaseModel):
    ttl_seconds: int = Field(default=900, ge=60)
    issuer: str = "provbridge"
    audience: str = "provbridge-mqtt"
    # A token refresh is refused when its timestamp is further than this from the bridge's clock.
    refresh_skew_seconds: int = Field(default=300, ge=10, le=3600)
    # How long verifiers may cache the JWKS served at /.well-known/jwks.json (Cache-Control max-age). A token key
    # is published this long before it signs anything when rotations are at least this far apart.
    jwks_max_age_seconds: int = Field(default=300, ge=0, le=86400)

    @model_validator(mode="after")
    def _ttl_is_capped(self) -> "TokenSettings":
        if self.ttl_seconds > TOKEN_TTL_CAP_SECONDS:
            raise ValueError(f"token.ttl_seconds is capped at {TOKEN_TTL_CAP_SECONDS}")
        return self


class ClaimSettings(BaseModel):
    response_retention_seconds: int = Field(default=86_400, ge=60)
    # Rows of the `events` table older than this are deleted by the periodic purge; 0 keeps them forever.
    event_retention_days: int = Field(default=30, ge=0, le=36_500)
    # Claim worker threads of a paho bridge process. One is fastest when no broker round trip sits in the
    # claim (they share one GIL: measured, 4 threads answered ~15 % fewer claims/s than 1); for more
    # cores, run more processes (`processes`).
    workers: int = Field(default=1, ge=1, le=64)
    # Bridge processes sharing the claims through shared subscriptions (external broker only).
    processes: int = Field(default=1, ge=1, le=64)
    # Bridge processes sharing the claims on every host together (several hosts on one broker and database): each
    # process enforces 1/N of every flood limit below, so that the fleet enforces them as one bridge would. 0: this
    # host's `processes`.
    fleet_processes: int = Field(default=0, ge=0, le=4096)
    # Sized for a 10,000-device herd; worst case ~16 KiB a queued claim (160 MiB), typically ~1 KiB.
    max_in_flight: int = Field(default=10_000, ge=1)
    retry_after_seconds: int = Field(default=2, ge=1)
    code_ttl_seconds: int = Field(default=86_400, ge=60)
    # Flood limits (bridge/claims/ratelimit.py): token buckets, `*_per_second` refill and `*_burst` size; a rate of 0
    # turns that limit off. Beyond one, the answer is rate_limited with retry_after = seconds until a token.
    # Off until the test suite's many-messages-from-one-client tests opt out (docs/RELIABILITY.md section 6).
    rate_limits: bool = True
    # Per MQTT client id, on claims and refreshes, before the payload is parsed:
    rate_client_per_second: float = Field(default=5.0, ge=0)
    rate_client_burst: int = Field(default=10, ge=1)
    # Embedded broker: after a refusal by the client-id limit, read nothing more from that client for up
    # to this long (until its next token, at most this): a flood then waits in the flooder's own buffers.
    rate_client_pause_seconds: float = Field(default=0.1, ge=0, le=10)
    # Per device: a claim's (hardware_id, provisioning key) pair, a refresh's device_id.
    rate_device_per_second: float = Field(default=1.0, ge=0)
    rate_device_burst: int = Field(default=5, ge=1)
    # Per `pk_` provisioning key: sized like max_in_flight for a 10,000-device herd (the bridge does ~1,300/s).
    rate_key_per_second: float = Field(default=1_000.0, ge=0)
    rate_key_burst: int = Field(default=10_000, ge=1)
    # Per PROV-XXXX-XXXX human code: 40 bits are guessable at the pace of a `pk_` key.
    rate_code_per_second: float = Field(default=0.1, ge=0)
    rate_code_burst: int = Field(default=3, ge=1)
    # All human-code claims together: a guesser tries a new code each time, which no per-code limit sees.
    # 10/s against 2^40 codes: with 1,000 codes outstanding, ~3.5 years per expected hit.
    rate_all_codes_per_second: float = Field(default=10.0, ge=0)
    rate_all_codes_burst: int = Field(default=100, ge=1)
    # Events anyone can cause (no tenant: junk claims, unknown keys, unknown devices), per event and reason;
    # beyond, they are neither stored nor published, only counted at DEBUG in the log.
    rate_events_per_second: float = Field(default=10.0, ge=0)
    rate_events_burst: int = Field(default=100, ge=1)
    # Keys tracked per limit; beyond, the least recently seen is forgotten (~200 bytes each).
    rate_max_keys: int = Field(default=50_000, ge=100)

    @property
    def limit_shares(self) -> int:
        """The bridge processes each flood limit is shared by (each enforces its 1/N)."""
        return self.fleet_processes or self.processes


class ApiSettings(BaseModel):
    """The admin HTTP API (bridge/api): its own process, started by `serve` (or `provbridge api`)."""

    enabled: bool = True  # `serve` starts it
    host: str = "127.0.0.1"  # loopback only unless said otherwise
    port: int = Field(default=8780, ge=1, le=65535)
    tls: bool = False  # HTTPS with the broker's server certificate (<data_dir>/tls/server.pem, `provbridge tls init`)


class StorageSettings(BaseModel):
    """Where the bridge keeps its records (bridge/storage)."""

    # None: SQLite, <data_dir>/provbridge.db. A `postgresql://` URL: a PostgreSQL database, which bridges on several
    # hosts may share (docs/SCALING.md). Prefer a ~/.pgpass file or PGPASSWORD to a password in the URL.
    url: str | None = Field(default=None, pattern=r"^postgres(ql)?://", repr=False)  # it may hold a password
    # PostgreSQL: the key that encrypts the key files and bridge secret shared through the database
    # (bridge/storage/sharedfiles.py); every host of a deployment is given the same file. Default
    # <data_dir>/storage.key.
    key_file: Path | None = None
    # PostgreSQL: how often a running bridge takes the shared key files from the database (a rotation made on
    # another host reaches it within this time).
    key_sync_seconds: float = Field(default=5.0, ge=0.1, le=3600)


class RabbitMQSettings(BaseModel):
    """RabbitMQ as the broker (`broker.mode = "rabbitmq"`, docs/SCALING.md). Devices speak MQTT to its MQTT plugin
    (`broker.host`/`broker.port`); the bridge takes claims over AMQP from a quorum queue and answers through the
    MQTT plugin's topic exchange; it ends a revoked device's connections through the management API. Both as
    `broker.username` with the password of `bridge_secret_file` (`provbridge rabbitmq-config` writes the user)."""

    # AMQP listeners of the cluster's nodes, host:port, tried in turn (any node serves the replicated queue).
    amqp: list[str] = Field(default_factory=lambda: ["127.0.0.1:5672"], min_length=1)
    # Management API base URLs of the nodes, tried in turn.
    management: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:15672"], min_length=1)
    # No "/": a scope pattern cannot carry one (bridge/rabbitmq_scopes.py), so RabbitMQ's default vhost will not do.
    vhost: str = Field(default="provbridge", pattern=r"^[A-Za-z0-9_.:-]+$")
    queue: str = Field(default="provbridge.claims", pattern=r"^[A-Za-z0-9_.:-]+$")  # the quorum queue of claims
    exchange: str = Field(default="amq.topic", pattern=r"^[A-Za-z0-9_.:-]+$")  # the MQTT plugin's (mqtt.exchange)
    # A revoked device whose token is still valid may connect again (RabbitMQ cannot ask us): how often the
    # bridge looks for such connections and ends them (docs/SECURITY.md).
    revoke_sweep_seconds: float = Field(default=5.0, ge=0.5, le=300)


class Profile(BaseModel):
    """Topic scope of a device's token. `{device_id}` and `{tenant}` are filled in."""

    publish: list[str] = Field(default_factory=lambda: ["devices/{device_id}/#"])
    subscribe: list[str] = Field(default_factory=lambda: ["devices/{device_id}/#"])


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROVBRIDGE_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Path("data")
    topic_prefix: str = Field(default="prov/v1", pattern=r"^[^+#]+[^/+#]$")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"  # json: one object per line, with the request_id (bridge/logs.py)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    token: TokenSettings = Field(default_factory=TokenSettings)
    claims: ClaimSettings = Field(default_factory=ClaimSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    rabbitmq: RabbitMQSettings = Field(default_factory=RabbitMQSettings)
    profiles: dict[str, Profile] = Field(default_factory=lambda: {"default": Profile()})

    _config_file: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls._config_file))
        return tuple(sources)

    @property
    def bridge_secret_file(self) -> Path:
        return self.broker.password_file or self.data_dir / "bridge.secret"

    @property
    def database_file(self) -> Path:
        """The SQLite database's file (used only when `storage.url` is not set)."""
        return self.data_dir / "provbridge.db"

    @property
    def storage_key_file(self) -> Path:
        return self.storage.key_file or self.data_dir / "storage.key"

    @property
    def database(self) -> Path | str:
        """Where `Store` opens the database: `storage.url`, else the SQLite file in the data dir."""
        return self.storage.url or self.database_file


def load_settings(config_file: Path | None = None) -> Settings:
    """Load settings; raises ConfigError with a one-line reason."""
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file not found: {config_file}")
    if config_file is None and DEFAULT_CONFIG_FILE.is_file():
        config_file = DEFAULT_CONFIG_FILE
    Settings._config_file = config_file
    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"invalid setting {where}: {first['msg']}") from exc
    except (OSError, ValueError) as exc:
        # An unreadable or malformed file (TOML syntax, not UTF-8) or environment value: one line, no traceback.
        raise ConfigError(f"cannot read the configuration ({config_file or 'environment'}): {exc}") from exc
    finally:
        Settings._config_file = None
    if "default" not in settings.profiles:
        raise ConfigError("profiles must define a 'default' profile")
    if settings.broker.mode == "rabbitmq":
        _check_rabbitmq_scopes(settings)
    if settings.broker.host_id and settings.claims.fleet_processes < 2:
        raise ConfigError(
            "broker.host_id is for bridges on several hosts: set claims.fleet_processes to the bridge processes of"
            " all of them, or every host takes every claim"
        )
    needed = claim_packet_bytes(settings.topic_prefix)
    if settings.broker.max_packet_bytes < needed:
        raise ConfigError(f"broker.max_packet_bytes must be at least {needed}: the largest valid claim is that big")
    return settings


def _check_rabbitmq_scopes(settings: Settings) -> None:
    """Every profile's topics must be expressible as RabbitMQ scopes, or no claim could be answered."""
    for name, profile in settings.profiles.items():
        for topic_filter in [*profile.publish, *profile.subscribe]:
            try:
                filter_pattern(fill_scope_sample(topic_filter))
            except UnscopableFilter as exc:
                raise ConfigError(f'profile {name!r}: {exc}, which broker.mode = "rabbitmq" cannot have') from exc


def fill_scope_sample(topic_filter: str) -> str:
    return topic_filter.replace("{device_id}", "dev_x").replace("{tenant}", "tenant")
