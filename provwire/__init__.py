"""The provisioning wire contract (protocol v1): topics, messages, error codes and crypto.

Both the bridge and devices (the simulator, or firmware ported from docs/PROTOCOL.md) use
this package; it does no I/O and imports nothing of the bridge.
"""

PROTOCOL_VERSION = 1
