"""A simulated fleet of provbridge devices: claim over MQTT, open the sealed answer, connect with the token.

Only `provwire` (the wire contract) and third-party libraries are used here, never the bridge: the
simulator is a client like any firmware, and must keep working against a bridge it cannot see inside.
"""
