"""The token-bucket limiter on its own: injected time, no broker."""

from bridge.claims.ratelimit import REPORT_INTERVAL_SECONDS, FloodLimits, Rate, RateLimiter, check, client_limiter
from bridge.config import ClaimSettings


def take(limiter: RateLimiter, key: str, now: float) -> bool:
    return check([(limiter, key)], now) is None


def test_a_burst_is_allowed_then_refused_with_the_seconds_until_a_token() -> None:
    limiter = RateLimiter(Rate(per_second=0.1, burst=3), max_keys=10)
    assert [take(limiter, "k", 0.0) for _ in range(3)] == [True, True, True]
    hit = check([(limiter, "k")], 1.0)
    assert hit is not None
    assert hit.retry_after == 9  # one token refills in 10 s; 1 s has passed
    assert take(limiter, "k", 10.0)
    assert not take(limiter, "k", 10.5)


def test_retry_after_is_rounded_up_and_at_least_one_second() -> None:
    limiter = RateLimiter(Rate(per_second=100.0, burst=1), max_keys=10)
    assert take(limiter, "k", 0.0)
    hit = check([(limiter, "k")], 0.0)
    assert hit is not None and hit.retry_after == 1  # 10 ms, rounded up


def test_keys_are_independent() -> None:
    limiter = RateLimiter(Rate(per_second=1.0, burst=1), max_keys=10)
    assert take(limiter, "a", 0.0)
    assert not take(limiter, "a", 0.0)
    assert take(limiter, "b", 0.0)


def test_a_refusal_by_one_limit_spends_nothing_of_the_others() -> None:
    loose = RateLimiter(Rate(per_second=1.0, burst=2), max_keys=10)
    strict = RateLimiter(Rate(per_second=1.0, burst=1), max_keys=10)
    assert check([(loose, "x"), (strict, "y")], 0.0) is None
    hit = check([(loose, "x"), (strict, "y")], 0.0)
    assert hit is not None and hit.limiter is strict
    assert take(loose, "x", 0.0)  # its second token is still there


def test_the_longest_wait_is_the_one_reported() -> None:
    fast = RateLimiter(Rate(per_second=1.0, burst=1), max_keys=10)
    slow = RateLimiter(Rate(per_second=0.1, burst=1), max_keys=10)
    assert check([(fast, "k"), (slow, "k")], 0.0) is None
    hit = check([(fast, "k"), (slow, "k")], 0.0)
    assert hit is not None and hit.limiter is slow and hit.retry_after == 10


def test_a_rate_of_zero_turns_the_limit_off() -> None:
    limiter = RateLimiter(Rate(per_second=0.0, burst=1), max_keys=10)
    assert all(take(limiter, "k", 0.0) for _ in range(1000))
    assert len(limiter) == 0


def test_a_clock_stepping_back_mints_no_tokens() -> None:
    limiter = RateLimiter(Rate(per_second=1.0, burst=1), max_keys=10)
    assert take(limiter, "k", 100.0)
    assert not take(limiter, "k", 50.0)
    assert not take(limiter, "k", 100.5)
    assert take(limiter, "k", 101.0)


def test_refusals_are_reported_once_per_key_per_interval() -> None:
    limiter = RateLimiter(Rate(per_second=0.001, burst=1), max_keys=10)
    assert take(limiter, "k", 0.0)
    reports = []
    for second in range(int(3 * REPORT_INTERVAL_SECONDS)):
        hit = check([(limiter, "k")], float(second))
        assert hit is not None
        if hit.report:
            reports.append((second, hit.suppressed))
    interval = int(REPORT_INTERVAL_SECONDS)
    assert reports == [(0, 0), (interval, interval - 1), (2 * interval, interval - 1)]


def test_the_number_of_keys_is_capped_whatever_the_keys() -> None:
    limiter = RateLimiter(Rate(per_second=0.001, burst=1), max_keys=100)
    for i in range(10_000):  # an attacker with a fresh client id per message, all at once
        take(limiter, f"client-{i}", 0.0)
        assert len(limiter) <= 100
    assert not take(limiter, "client-9999", 0.0)  # the most recent ones are still remembered


def test_idle_buckets_are_forgotten() -> None:
    limiter = RateLimiter(Rate(per_second=1.0, burst=2), max_keys=1000)
    for i in range(500):
        take(limiter, f"k{i}", 0.0)
    assert len(limiter) == 500
    take(limiter, "late", 2.0)  # the others have refilled by now: full buckets hold nothing
    assert len(limiter) == 1


def test_the_bridge_limits_follow_the_settings() -> None:
    assert client_limiter(ClaimSettings(rate_limits=False)).rate == Rate(0.0, 10)  # off unless `rate_limits`
    assert FloodLimits(ClaimSettings(rate_limits=False)).code.rate == Rate(0.0, 3)
    assert client_limiter(ClaimSettings(rate_limits=True)).rate == Rate(5.0, 10)
    limits = FloodLimits(ClaimSettings(rate_limits=True))
    assert limits.code.rate == Rate(0.1, 3)
    assert limits.name(limits.code) == "human_code" and limits.name(limits.all_codes) == "all_human_codes"
    assert limits.tracked() == 0
