"""Real hardware and network facts of this host, as the `Hardware` and `Network` parts of a claim.

Everything here is best effort and must never raise: a device that cannot read its board model still
has to be able to claim. Nothing here sends a packet; the primary address is read from the kernel's
tables (routing table, `ip -j addr`, or the resolver's view of the hostname).
"""

import hashlib
import ipaddress
import json
import os
import platform
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from provwire.models import Hardware, Network

MAX_SHORT_TEXT = 128  # ShortText in provwire.models
MAX_ADDRESS = 64  # Network.ip and Network.mac
MAX_CONNECTION_TYPE = 32

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def _safe(fn: Callable[[], T | None]) -> T | None:
    """Run one probe; any failure means "unknown", never an exception for the caller."""
    try:
        return fn()
    except Exception:
        return None


def _clamp(value: str | None, limit: int = MAX_SHORT_TEXT) -> str | None:
    """Make a probed string acceptable to the strict models: printable, non-empty, within the limit."""
    if value is None:
        return None
    cleaned = "".join(c for c in value if c.isprintable()).strip()
    return cleaned[:limit] or None


def _read_text(path: str | Path) -> str | None:
    try:
        # device-tree strings are NUL-terminated; DMI ones end with a newline.
        return Path(path).read_text(encoding="utf-8", errors="replace").strip("\x00\n ")
    except OSError:
        return None


# --- hardware -------------------------------------------------------------------------------------------


def board_model(root: Path = Path("/")) -> str | None:
    """Single-board computers name themselves in the device tree; PCs and VMs in DMI."""
    for rel in (
        "proc/device-tree/model",
        "sys/firmware/devicetree/base/model",
        "sys/class/dmi/id/product_name",
    ):
        text = _read_text(root / rel)
        if text:
            return text
    return None


def ram_mb(meminfo: str | None = None) -> int | None:
    text = meminfo if meminfo is not None else _read_text("/proc/meminfo")
    if not text:
        return None
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) // 1024 if match else None


def os_pretty_name(os_release: str | None = None) -> str | None:
    text = (
        os_release if os_release is not None else (_read_text("/etc/os-release") or _read_text("/usr/lib/os-release"))
    )
    if text:
        match = re.search(r"^PRETTY_NAME=(.*)$", text, re.MULTILINE)
        if match:
            return match.group(1).strip().strip("\"'")
    # Not Linux, or a minimal container: the platform's own description is still better than nothing.
    return f"{platform.system()} {platform.release()}".strip() or None


def _build(model: type[M], fields: dict[str, object]) -> M:
    """The model with every probed field the contract accepts; a field it refuses is left out, not fatal."""
    try:
        return model.model_validate(fields)
    except ValidationError:
        pass
    kept = {}
    for name, value in fields.items():
        try:
            model.model_validate({name: value})
        except ValidationError:
            continue
        kept[name] = value
    try:
        return model.model_validate(kept)
    except ValidationError:  # fields that pass alone but not together: no inventory beats no claim
        return model.model_validate({})


def hardware() -> Hardware:
    return _build(
        Hardware,
        {
            "board_model": _clamp(_safe(board_model)),
            "cpu_cores": _safe(os.cpu_count),
            "ram_mb": _safe(ram_mb),
            "os": _clamp(_safe(os_pretty_name)),
            "arch": _clamp(_safe(platform.machine)),
            "kernel": _clamp(_safe(platform.release)),
        },
    )


# --- network --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interface:
    name: str
    ip: str | None


def default_route_interface(route_table: str | None = None) -> str | None:
    """The interface of the IPv4 default route with the lowest metric, from /proc/net/route."""
    text = route_table if route_table is not None else _read_text("/proc/net/route")
    if not text:
        return None
    best: tuple[int, str] | None = None
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        iface, destination, flags, metric, mask = fields[0], fields[1], fields[3], fields[6], fields[7]
        try:
            up = int(flags, 16) & 0x1  # RTF_UP
            if destination != "00000000" or mask != "00000000" or not up:
                continue
            candidate = (int(metric), iface)
        except ValueError:
            continue
        if best is None or candidate < best:
            best = candidate
    return best[1] if best else None


def _usable(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return not (addr.is_loopback or addr.is_link_local or addr.is_unspecified or addr.is_multicast)


def addresses_from_ip_json(ip_json: str) -> dict[str, list[str]]:
    """Interface name -> usable addresses (IPv4 first), parsed from `ip -j addr` output."""
    result: dict[str, list[str]] = {}
    for link in json.loads(ip_json):
        name = link.get("ifname")
        if not isinstance(name, str):
            continue
        infos = [a for a in link.get("addr_info", []) if isinstance(a, dict)]
        infos.sort(key=lambda a: 0 if a.get("family") == "inet" else 1)
        result[name] = [a["local"] for a in infos if isinstance(a.get("local"), str) and _usable(a["local"])]
    return result


def _addresses_from_ip_command() -> dict[str, list[str]] | None:
    ip_bin = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.path.exists(p)), None)
    if ip_bin is None:
        return None
    out = subprocess.run([ip_bin, "-j", "addr", "show"], capture_output=True, text=True, timeout=2, check=True).stdout
    return addresses_from_ip_json(out)


def local_addresses_from_fib_trie(fib_trie: str) -> list[str]:
    """Host-local IPv4 addresses from /proc/net/fib_trie (the `/32 host LOCAL` leaves)."""
    found: list[str] = []
    last_ip: str | None = None
    for line in fib_trie.splitlines():
        stripped = line.strip()
        if stripped.startswith("|--"):
            last_ip = stripped[3:].strip()
        elif "/32 host LOCAL" in stripped and last_ip and _usable(last_ip) and last_ip not in found:
            found.append(last_ip)
    return found


def _ipv4_networks_of(iface: str, route_table: str) -> list[ipaddress.IPv4Network]:
    """The directly connected subnets of one interface, to match fib_trie addresses to it."""
    nets = []
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or fields[0] != iface or fields[1] == "00000000":
            continue
        try:
            # /proc/net/route prints addresses as host-order (little-endian on every Linux we run on) hex.
            dest = socket.inet_ntoa(int(fields[1], 16).to_bytes(4, "little"))
            mask = socket.inet_ntoa(int(fields[7], 16).to_bytes(4, "little"))
            nets.append(ipaddress.IPv4Network(f"{dest}/{mask}", strict=False))
        except (ValueError, OSError):
            continue
    return nets


def _ip_from_proc(iface: str) -> str | None:
    route_table = _read_text("/proc/net/route") or ""
    fib = _read_text("/proc/net/fib_trie") or ""
    nets = _ipv4_networks_of(iface, route_table)
    for ip in local_addresses_from_fib_trie(fib):
        if any(ipaddress.IPv4Address(ip) in net for net in nets):
            return ip
    return None


def _ip_from_resolver(hostname: str) -> str | None:
    # Resolving our own name reads /etc/hosts first; on most hosts this sends nothing.
    infos = socket.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)
    addrs = [str(info[4][0]) for info in infos]
    addrs.sort(key=lambda a: 0 if ":" not in a else 1)
    return next((a for a in addrs if _usable(a)), None)


def primary_interface(hostname: str | None = None) -> Interface:
    """The interface the default route uses, and its address; falls back as far as loopback."""
    by_iface = _safe(_addresses_from_ip_command) or {}
    iface = _safe(default_route_interface)
    if iface is None:
        # No IPv4 default route (IPv6-only, or an isolated lab net): take the first interface with an address.
        iface = next((name for name, addrs in by_iface.items() if addrs and name != "lo"), None)
    if iface is not None:
        addrs = by_iface.get(iface) or []
        ip = addrs[0] if addrs else _safe(lambda: _ip_from_proc(iface))
        return Interface(iface, ip)
    ip = _safe(lambda: _ip_from_resolver(hostname)) if hostname else None
    if ip is None:
        return Interface("lo", "127.0.0.1")
    owner = next((name for name, addrs in by_iface.items() if ip in addrs), "")
    return Interface(owner, ip)


def mac_address(iface: str, sys_net: Path = Path("/sys/class/net")) -> str | None:
    if not iface or "/" in iface:
        return None
    mac = _read_text(sys_net / iface / "address")
    return mac if mac and mac != "00:00:00:00:00:00" else None


def connection_type(iface: str, sys_net: Path = Path("/sys/class/net")) -> str | None:
    """A guess from kernel facts first (the wireless directory), then conventional interface names."""
    if not iface:
        return None
    if iface == "lo" or iface.startswith("lo"):
        return "loopback"
    if "/" not in iface and (sys_net / iface / "wireless").exists():
        return "wifi"
    if re.match(r"^(wl|wlan|wifi|ath|ra)\d*", iface):
        return "wifi"
    if re.match(r"^(ww|wwan|rmnet|ppp|usb|qmi|cdc|mhi)", iface):
        return "cellular"
    if re.match(r"^(eth|en|em|eno|ens|enp|enx|br|bond|veth|end)", iface):
        return "ethernet"
    return "other"


def network() -> Network:
    hostname = _clamp(_safe(socket.gethostname))
    primary = _safe(lambda: primary_interface(hostname)) or Interface("", None)
    return _build(
        Network,
        {
            "hostname": hostname,
            "ip": _clamp(primary.ip, MAX_ADDRESS),
            "mac": _clamp(_safe(lambda: mac_address(primary.name)), MAX_ADDRESS),
            "connection_type": _clamp(_safe(lambda: connection_type(primary.name)), MAX_CONNECTION_TYPE),
        },
    )


# --- identity of this host (for simulated hardware ids) ----------------------------------------------------


def host_fingerprint() -> str:
    """8 hex chars that differ between hosts, so fleets simulated on two hosts get distinct hardware ids."""
    seed = _read_text("/etc/machine-id") or _read_text("/var/lib/dbus/machine-id") or _safe(socket.gethostname)
    return hashlib.sha256((seed or "unknown-host").encode("utf-8")).hexdigest()[:8]


def default_hardware_id_prefix() -> str:
    return f"sim-{_safe(host_fingerprint) or '00000000'}-"


def simulated_hardware_id(index: int, prefix: str | None = None) -> str:
    """A distinct hardware id per simulated device: `<prefix><index:06d>`, e.g. `sim-1a2b3c4d-000007`."""
    return f"{default_hardware_id_prefix() if prefix is None else prefix}{index:06d}"
