"""Informational measurements of the fault tests, as `FAULTS name key=value ...` lines."""

import logging

log = logging.getLogger("tests.faults")


def figure(name: str, **values: object) -> None:
    """An informational measurement, printed for docs/RELIABILITY.md (`pytest -s` or the log)."""
    line = "FAULTS " + name + " " + " ".join(f"{k}={v}" for k, v in values.items())
    log.warning(line)
    print(line)
