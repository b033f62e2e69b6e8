"""Host facts for claims: real values on this host, never an exception, always valid models."""

import os
import platform
import socket
from pathlib import Path

import pytest

from device_sim import hostinfo
from provwire.models import Claim, Hardware, Network

ROUTE_TABLE = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
"""

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
           |-- 127.0.0.1
              /32 host LOCAL
     +-- 192.0.2.0/24 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.7
              /32 host LOCAL
"""

IP_JSON = """[
 {"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1"}]},
 {"ifname": "eth0", "addr_info": [
   {"family": "inet6", "local": "fe80::1"},
   {"family": "inet6", "local": "2001:db8::7"},
   {"family": "inet", "local": "192.0.2.7"}]},
 {"ifname": "wlan0"}
]"""


def test_hardware_and_network_of_this_host_are_valid_models() -> None:
    hw, net = hostinfo.hardware(), hostinfo.network()
    assert isinstance(hw, Hardware) and isinstance(net, Network)
    # Re-validating the dump proves every field is within the contract's limits.
    Hardware.model_validate(hw.model_dump())
    Network.model_validate(net.model_dump())
    assert hw.cpu_cores is None or hw.cpu_cores >= 1
    for text in (hw.board_model, hw.os, hw.arch, hw.kernel, net.hostname):
        assert text is None or 1 <= len(text) <= 128


def test_host_facts_fit_in_a_claim() -> None:
    from device_sim.device import DeviceIdentity, build_claim

    claim = build_claim(DeviceIdentity.generate("hw-1"), "pk_x", "r-12345678", hostinfo.hardware(), hostinfo.network())
    assert Claim.model_validate_json(claim.model_dump_json()) == claim


def test_hostinfo_never_raises_when_every_probe_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("probe failed")

    for name in ("_read_text", "_addresses_from_ip_command", "default_route_interface", "_ip_from_resolver"):
        monkeypatch.setattr(hostinfo, name, boom)
    monkeypatch.setattr(os, "cpu_count", boom)
    monkeypatch.setattr(socket, "gethostname", boom)
    monkeypatch.setattr(platform, "machine", boom)
    hw, net = hostinfo.hardware(), hostinfo.network()
    assert hw.cpu_cores is None and hw.arch is None
    assert net.hostname is None
    assert hostinfo.simulated_hardware_id(1).endswith("-000001")


def test_out_of_contract_values_are_dropped_or_clamped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostinfo, "board_model", lambda: "Pi\x00 " + "x" * 500)
    monkeypatch.setattr(os, "cpu_count", lambda: 0)  # out of range: dropped, not fatal
    hw = hostinfo.hardware()
    assert hw.board_model is not None and len(hw.board_model) == 128 and hw.board_model.isprintable()
    assert hw.cpu_cores is None


def test_board_model_prefers_device_tree_then_dmi(tmp_path: Path) -> None:
    assert hostinfo.board_model(tmp_path) is None
    (tmp_path / "sys/class/dmi/id").mkdir(parents=True)
    (tmp_path / "sys/class/dmi/id/product_name").write_text("Standard PC (Q35)\n")
    assert hostinfo.board_model(tmp_path) == "Standard PC (Q35)"
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\x00")
    assert hostinfo.board_model(tmp_path) == "Raspberry Pi 4 Model B Rev 1.4"


def test_meminfo_and_os_release_parsing() -> None:
    assert hostinfo.ram_mb("MemTotal:        3884096 kB\nMemFree: 1 kB\n") == 3793
    assert hostinfo.ram_mb("nothing here") is None
    assert hostinfo.os_pretty_name('NAME="X"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n') == (
        "Debian GNU/Linux 12 (bookworm)"
    )


def test_default_route_picks_lowest_metric() -> None:
    assert hostinfo.default_route_interface(ROUTE_TABLE) == "eth0"
    assert hostinfo.default_route_interface(ROUTE_TABLE.splitlines()[0]) is None


def test_addresses_from_ip_json_prefer_ipv4_and_skip_loopback_and_link_local() -> None:
    by_iface = hostinfo.addresses_from_ip_json(IP_JSON)
    assert by_iface == {"lo": [], "eth0": ["192.0.2.7", "2001:db8::7"], "wlan0": []}


def test_fib_trie_local_addresses() -> None:
    assert hostinfo.local_addresses_from_fib_trie(FIB_TRIE) == ["192.0.2.7"]


def test_connection_type_guess(tmp_path: Path) -> None:
    assert hostinfo.connection_type("lo", tmp_path) == "loopback"
    assert hostinfo.connection_type("eth0", tmp_path) == "ethernet"
    assert hostinfo.connection_type("enp3s0", tmp_path) == "ethernet"
    assert hostinfo.connection_type("wlan0", tmp_path) == "wifi"
    assert hostinfo.connection_type("wwan0", tmp_path) == "cellular"
    (tmp_path / "odd0" / "wireless").mkdir(parents=True)
    assert hostinfo.connection_type("odd0", tmp_path) == "wifi"  # the kernel's word beats the name
    assert hostinfo.connection_type("tun0", tmp_path) == "other"


def test_mac_address_ignores_missing_and_zero(tmp_path: Path) -> None:
    (tmp_path / "eth0").mkdir()
    (tmp_path / "eth0" / "address").write_text("02:fc:00:00:00:01\n")
    (tmp_path / "lo").mkdir()
    (tmp_path / "lo" / "address").write_text("00:00:00:00:00:00\n")
    assert hostinfo.mac_address("eth0", tmp_path) == "02:fc:00:00:00:01"
    assert hostinfo.mac_address("lo", tmp_path) is None
    assert hostinfo.mac_address("nope", tmp_path) is None
    assert hostinfo.mac_address("../etc", tmp_path) is None


def test_simulated_hardware_ids_are_distinct_and_stable() -> None:
    ids = {hostinfo.simulated_hardware_id(i) for i in range(1, 1001)}
    assert len(ids) == 1000
    assert hostinfo.simulated_hardware_id(7) == hostinfo.simulated_hardware_id(7)
    assert hostinfo.simulated_hardware_id(7, "lab-a-") == "lab-a-000007"
    assert hostinfo.simulated_hardware_id(7).startswith("sim-")
