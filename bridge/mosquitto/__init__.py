"""Everything specific to an external Mosquitto 2.0.

`conf` (renders mosquitto.conf, the ACL file and dynamic security from the role table), `files`
(`provbridge mosquitto-config`), `dynsec` (the dynamic-security mirror of device tokens), `janitor`
(removes expired tokens from Mosquitto), `jwt` (the provbridge_jwt plugin: its C source, its build),
and `install-mosquitto.sh` (what `make mosquitto` runs).
"""
