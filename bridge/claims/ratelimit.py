"""Token-bucket rate limits keyed by string. Pure: the caller passes `now`; no I/O, no threads of its own.

Each key (a client id, a hardware id, a provisioning-key hash, a device id) has a bucket of `burst`
tokens refilled at `rate` per second; a request takes one token or is refused with the seconds until
one is available. Memory is bounded whatever the keys: a bucket that has refilled completely carries
no information and is dropped, and at most `max_keys` buckets are kept (the least recently used goes
first), so an attacker inventing a fresh client id per message cannot grow the table.
"""

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

from bridge.config import ClaimSettings

# At most one report (a `claim.rate_limited` event) per key per this many seconds; refusals between are counted.
REPORT_INTERVAL_SECONDS = 60.0


@dataclass(frozen=True)
class Rate:
    per_second: float  # 0 disables the limit
    burst: int

    @property
    def enabled(self) -> bool:
        return self.per_second > 0 and self.burst > 0


@dataclass
class _Bucket:
    tokens: float
    updated: float
    reported: float = -math.inf  # when the last refusal report for this key went out
    suppressed: int = 0  # refusals since then, not reported one by one


@dataclass(frozen=True)
class LimitHit:
    """A request one limit refused: which, for which key, and what to tell the requester."""

    limiter: "RateLimiter"
    key: str
    retry_after: int  # whole seconds, >= 1
    wait: float  # the exact seconds until a token is available
    report: bool  # True at most once per key per REPORT_INTERVAL_SECONDS
    suppressed: int  # refusals of this key not reported since the previous report


class RateLimiter:
    """One limit over many keys. Thread-safe (the paho edge may run several claim workers)."""

    def __init__(self, rate: Rate, max_keys: int) -> None:
        self.rate = rate
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, bucket: _Bucket, now: float) -> float:
        elapsed = max(0.0, now - bucket.updated)  # a clock stepping back must not mint tokens
        return min(float(self.rate.burst), bucket.tokens + elapsed * self.rate.per_second)

    def _refilled(self, key: str, now: float) -> _Bucket:
        """The bucket of `key` brought up to `now` (callers then `_store` it, keeping LRU = update order)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return _Bucket(float(self.rate.burst), now)
        bucket.tokens, bucket.updated = self._tokens(bucket, now), max(bucket.updated, now)
        return bucket

    def wait(self, key: str, now: float) -> float:
        """Seconds until `key` has a token (0 when it has one now). Takes nothing."""
        if not self.rate.enabled:
            return 0.0
        with self._lock:
            bucket = self._buckets.get(key)
            tokens = self._tokens(bucket, now) if bucket is not None else float(self.rate.burst)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate.per_second

    def take(self, key: str, now: float) -> None:
        """Spend one token of `key` (the caller checked `wait` first)."""
        if not self.rate.enabled:
            return
        with self._lock:
            bucket = self._refilled(key, now)
            bucket.tokens = max(0.0, bucket.tokens - 1.0)
            self._store(key, bucket, now)

    def refuse(self, key: str, wait: float, now: float) -> LimitHit:
        """Record a refusal of `key`; say whether it is the one to report this interval."""
        with self._lock:
            bucket = self._refilled(key, now)
            report = now - bucket.reported >= REPORT_INTERVAL_SECONDS
            suppressed = bucket.suppressed
            if report:
                bucket.reported, bucket.suppressed = now, 0
            else:
                bucket.suppressed += 1
            self._store(key, bucket, now)
        retry_after = max(1, math.ceil(wait))
        return LimitHit(self, key, retry_after=retry_after, wait=wait, report=report, suppressed=suppressed)

    def _store(self, key: str, bucket: _Bucket, now: float) -> None:
        self._buckets[key] = bucket
        self._buckets.move_to_end(key)
        self._evict_idle(now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)  # the least recently used: an attacker's old ids go first

    def _evict_idle(self, now: float) -> None:
        """Drop buckets that are full again (they hold no state) and not in a report interval, oldest first."""
        while self._buckets:
            key, oldest = next(iter(self._buckets.items()))
            full_at = oldest.updated + (self.rate.burst - oldest.tokens) / self.rate.per_second
            if full_at > now or now - oldest.reported < REPORT_INTERVAL_SECONDS:
                return  # the rest were updated later; a few idle ones may linger until max_keys evicts them
            del self._buckets[key]


def check(limits: list[tuple[RateLimiter, str]], now: float) -> LimitHit | None:
    """Take one token from each (limiter, key), or from none: the refusal of the limit that waits longest.

    All or nothing, so a request refused by one limit does not spend the budget of the others.
    """
    waits = [(limiter.wait(key, now), limiter, key) for limiter, key in limits]
    longest = max(waits, default=None, key=lambda w: w[0])
    if longest is not None and longest[0] > 0:
        wait, limiter, key = longest
        return limiter.refuse(key, wait, now)
    for limiter, key in limits:
        limiter.take(key, now)
    return None


def limiter(claims: ClaimSettings, per_second: float, burst: int) -> RateLimiter:
    """A limiter of `claims.rate_*`, disabled when `claims.rate_limits` is off: this process's share of it. Shared
    subscriptions spread a client's messages over the bridge processes, so each enforces 1/N of the rate and of the
    burst (at least one message), and the N together hold the fleet to the limit (docs/RELIABILITY.md §6)."""
    shares = claims.limit_shares
    rate = Rate(per_second / shares if claims.rate_limits else 0.0, max(1, round(burst / shares)))
    return RateLimiter(rate, claims.rate_max_keys)


def client_limiter(claims: ClaimSettings) -> RateLimiter:
    """The per-client-id limit. The edge applies it (`edge.BridgeCore.screen`), before a message is queued."""
    return limiter(claims, claims.rate_client_per_second, claims.rate_client_burst)


class FloodLimits:
    """The limits the claim worker applies once a message is parsed, shared by its claim and refresh routes."""

    def __init__(self, claims: ClaimSettings) -> None:
        c = claims
        self.device = limiter(c, c.rate_device_per_second, c.rate_device_burst)
        self.key = limiter(c, c.rate_key_per_second, c.rate_key_burst)
        self.code = limiter(c, c.rate_code_per_second, c.rate_code_burst)
        self.all_codes = limiter(c, c.rate_all_codes_per_second, c.rate_all_codes_burst)  # one key
        self.events = limiter(c, c.rate_events_per_second, c.rate_events_burst)

    def tracked(self) -> int:
        """Buckets held over all limits: bounded by 4 × `claims.rate_max_keys` + 1."""
        limits = (self.device, self.key, self.code, self.all_codes, self.events)
        return sum(len(limiter) for limiter in limits)

    def name(self, limiter: RateLimiter) -> str:
        """Which limit refused, for the event's `reason`."""
        names = {
            id(self.device): "device",
            id(self.key): "provision_key",
            id(self.code): "human_code",
            id(self.all_codes): "all_human_codes",
        }
        return names.get(id(limiter), "events")
