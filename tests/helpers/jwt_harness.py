"""The provbridge_jwt plugin's decisions from Python: bridge/mosquitto/jwt/harness.c, a small program that
includes the plugin's source and answers requests on stdin (the protocol is at the top of harness.c).

It is built with AddressSanitizer, UBSan and LeakSanitizer (`make -C bridge/mosquitto/jwt harness`); a
sanitizer report ends it, and `PluginHarness` then raises with the report. PROVBRIDGE_JWT_HARNESS=/path uses
a harness built elsewhere instead (one built from a deliberately broken copy of the plugin, say).
"""

import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import pytest

from bridge.mosquitto import jwt as mosquitto_jwt

HARNESS = mosquitto_jwt.SOURCE_DIR.parents[2] / "build" / "mosquitto_jwt_harness" / "harness"
HARNESS_ENV = "PROVBRIDGE_JWT_HARNESS"
Access = Literal["write", "read", "subscribe"]


def harness_path() -> Path:
    """The harness program: PROVBRIDGE_JWT_HARNESS, else this checkout's, built now if need be (skipped when
    it cannot be, except under CI, as for the plugin itself)."""
    override = os.environ.get(HARNESS_ENV)
    if override:
        return Path(override)
    make = shutil.which("make")
    done = (
        subprocess.run([make, "-s", "-C", str(mosquitto_jwt.SOURCE_DIR), "harness"], capture_output=True, text=True)
        if make
        else None
    )
    if done is None or done.returncode != 0 or not HARNESS.is_file():
        detail = "no make" if done is None else (done.stderr or done.stdout).strip()[-2000:]
        if os.environ.get("CI"):
            pytest.fail(f"the provbridge_jwt harness cannot be built but CI is set: {detail}")
        pytest.skip(f"the provbridge_jwt harness cannot be built here ({detail}); {mosquitto_jwt.BUILD_HINT}")
    return HARNESS


@dataclass(frozen=True)
class Connect:
    """The plugin's answer to a CONNECT: accepted (with what the session holds), refused (reason), deferred."""

    outcome: Literal["accepted", "refused", "deferred"]
    reason: str = ""
    exp: int | None = None
    acl_json: str | None = None
    generation: float | None = None  # the token's gen (0 when absent)
    denied_until: int | None = None  # until when the denylist refuses this token (0: it does not)
    session: int | None = None  # the kept session's number (connect(keep=True)), for session_acl


@dataclass(frozen=True)
class CertificateConnect:
    """The plugin's answer to a CONNECT over a client certificate: accepted (with what the session holds) or
    refused (reason)."""

    outcome: Literal["accepted", "refused"]
    reason: str = ""
    device_id: str | None = None
    not_after: int | None = None
    scope_json: str | None = None
    serial: str | None = None  # lowercase hex, as broker/certificates.py gives it
    denied_until: int | None = None
    session: int | None = None


class HarnessDied(AssertionError):
    """The harness ended mid-request: a sanitizer report (in the message) or a crash."""


class PluginHarness:
    """One running harness; `close()` checks that it ends cleanly (LeakSanitizer runs at its exit)."""

    def __init__(self, program: Path) -> None:
        # Where a sanitizer writes its report: read when the harness dies, closed with the harness.
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the harness
        env = {
            **os.environ,
            # Every report is fatal: -fno-sanitize-recover for UBSan, halt_on_error for ASan and LSan.
            "ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1:abort_on_error=0",
            "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        }
        self._process = subprocess.Popen(
            [str(program)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env
        )

    # --- the protocol ---

    def _request(self, command: bytes, *fields: str | bytes) -> tuple[str, list[bytes]]:
        return self._pipeline([(command, fields)])[0]

    def _pipeline(self, requests: Sequence[tuple[bytes, tuple[str | bytes, ...]]]) -> list[tuple[str, list[bytes]]]:
        """Requests sent together, then their answers read: one round trip instead of one each. The caller
        keeps a batch's answers under the pipe's buffer (64 KiB), or both sides would wait on each other."""
        assert self._process.stdin is not None
        message = bytearray()
        for command, fields in requests:
            message += command
            for field in fields:
                raw = field.encode("utf-8") if isinstance(field, str) else field
                message += struct.pack("<I", len(raw)) + raw
        try:
            self._process.stdin.write(bytes(message))
            self._process.stdin.flush()
            return [self._answer() for _ in requests]
        except (BrokenPipeError, EOFError) as exc:
            raise HarnessDied(self._death()) from exc

    def _answer(self) -> tuple[str, list[bytes]]:
        code = self._read(1).decode("ascii")
        (count,) = struct.unpack("<I", self._read(4))
        fields = []
        for _ in range(count):
            (length,) = struct.unpack("<I", self._read(4))
            fields.append(self._read(length))
        return code, fields

    def _read(self, n: int) -> bytes:
        assert self._process.stdout is not None
        data = self._process.stdout.read(n)
        if len(data) != n:
            raise EOFError
        return data

    def _death(self) -> str:
        code = self._process.wait(timeout=30)
        self._stderr.seek(0)
        return f"the provbridge_jwt harness exited with {code}:\n{self._stderr.read().decode(errors='replace')}"

    def close(self) -> None:
        """Ends the harness; HarnessDied unless it exits with 0 and an empty stderr (no leak, no report)."""
        assert self._process.stdin is not None
        self._process.stdin.close()
        code = self._process.wait(timeout=60)
        self._stderr.seek(0)
        errors = self._stderr.read().decode(errors="replace")
        self._stderr.close()
        if code != 0 or errors:
            raise HarnessDied(f"the provbridge_jwt harness exited with {code}:\n{errors}")

    # --- the plugin ---

    def configure(self, *, jwks_file: Path, denylist_file: Path, audience: str, issuer: str) -> None:
        code, _ = self._request(b"P", str(jwks_file), str(denylist_file), audience, issuer)
        assert code == "+", "the plugin refused its options"

    def refresh(self, *, force: bool = False) -> list[str]:
        """Re-reads the files that changed (force: both), as the broker's tick does; the usable kids."""
        code, kids = self._request(b"R", "1" if force else "0")
        assert code == "+"
        return [kid.decode("utf-8") for kid in kids]

    def connect(self, username: str, client_id: str, password: bytes, now: float, *, keep: bool = False) -> Connect:
        """A CONNECT at `now`; an accepted session is ended again unless `keep` (then `disconnect` it)."""
        code, fields = self._request(b"C", username, client_id, password, repr(now))
        if code == "A":
            session = int(fields[4])
            if not keep:
                self.disconnect(session)
            return Connect(
                "accepted",
                exp=int(fields[0]),
                acl_json=fields[1].decode("utf-8"),
                generation=float(fields[2]),
                denied_until=int(fields[3]),
                session=session if keep else None,
            )
        if code == "R":
            return Connect("refused", reason=fields[0].decode("utf-8"))
        assert code == "D", code
        return Connect("deferred")

    def session_acl(self, session: int, *, access: Access, topic: str, now: int) -> tuple[bool, int]:
        """The ACL check of a kept session, after changed files are re-read (as on the broker's tick): whether
        it is allowed, and the session's denied_until."""
        code, fields = self._request(b"T", str(session), access, topic, str(now))
        assert code in "YN", code
        return code == "Y", int(fields[0])

    def disconnect(self, session: int) -> None:
        code, _ = self._request(b"D", str(session))
        assert code == "+", code

    def acl(self, acl_json: str, *, exp: int, denied_until: int, access: Access, topic: str, now: int) -> bool | None:
        """The ACL check of a session holding this acl object; None when the plugin would not take the object."""
        code, _ = self._request(b"S", acl_json, str(exp), str(denied_until), access, topic, str(now))
        return None if code == "E" else code == "Y"

    def scope_value(self, der: bytes) -> tuple[str, str]:
        """A device certificate's scope extension value read by the plugin: ("accepted", the scope as JSON)
        or ("refused", the reason)."""
        code, fields = self._request(b"X", der.hex())
        assert code in "AR", code
        return ("accepted" if code == "A" else "refused"), fields[0].decode("utf-8")

    def connect_certificate(
        self, der: bytes, username: str, client_id: str, now: float, *, keep: bool = False
    ) -> CertificateConnect:
        """A CONNECT over a client certificate (DER) at `now`; an accepted session is kept as by `connect`."""
        code, fields = self._request(b"K", der.hex(), username, client_id, repr(now))
        assert code in "AR", code
        text = [f.decode("utf-8") for f in fields]
        if code == "R":
            return CertificateConnect("refused", reason=text[0])
        session = int(text[5])
        if not keep:
            self.disconnect(session)
        return CertificateConnect(
            "accepted",
            device_id=text[0],
            not_after=int(text[1]),
            scope_json=text[2],
            serial=text[3],
            denied_until=int(text[4]),
            session=session if keep else None,
        )

    def topic_matches(self, topic_filter: str, topic: str) -> bool:
        return self._request(b"M", topic_filter, topic)[0] == "Y"

    def filter_covers(self, allowed: str, requested: str) -> bool:
        return self._request(b"V", allowed, requested)[0] == "Y"

    def is_valid_filter(self, topic_filter: str) -> bool:
        return self._request(b"F", topic_filter)[0] == "Y"

    def many_filter_covers(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """filter_covers for each (allowed, requested), in batches: for exhaustive checks."""
        return self._many(b"V", pairs)

    def many_topic_matches(self, pairs: list[tuple[str, str]]) -> list[bool]:
        return self._many(b"M", pairs)

    def _many(self, command: bytes, pairs: list[tuple[str, str]]) -> list[bool]:
        answers: list[bool] = []
        for start in range(0, len(pairs), 5000):  # 5 bytes an answer: 25 KB a batch
            batch = [(command, pair) for pair in pairs[start : start + 5000]]
            answers += [code == "Y" for code, _ in self._pipeline(batch)]
        return answers
