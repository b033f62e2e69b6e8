"""The demo end to end: the real `provbridge` CLI in subprocesses, the simulator in-process."""

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from device_sim import demo


def _provbridge_available() -> bool:
    return Path(sys.executable).with_name("provbridge").is_file() or shutil.which("provbridge") is not None


@pytest.mark.skipif(not _provbridge_available(), reason="the provbridge command is not installed")
def test_demo_provisions_every_device_and_stops_the_bridge(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Its temp dir (serve.log, data, sim-data) and output kept under the basetemp, every record logged, for
    # the whole-suite secret scan.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("PROVBRIDGE_LOG_LEVEL", "DEBUG")
    assert demo.main(["--devices", "5", "--concurrency", "3", "--timeout", "5", "--keep"]) == 0
    out, err = capsys.readouterr()
    (tmp_path / "demo-output.log").write_text(out + err)
    assert "5/5 devices ok (5 created), 0 failed" in out
    assert "bridge stopped (exit status 0)" in err
    assert "pk_" not in out + err  # the provisioning key init printed is never shown
