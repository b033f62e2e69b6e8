"""An external Mosquitto: its configuration files, dynamic security and the janitor of expired tokens.

`files` (`provbridge mosquitto-config`), `dynsec` (the dynamic-security mirror of device tokens),
`janitor` (removes expired tokens from Mosquitto). The config renderer and the JWT plugin still live
in broker/ (`broker.mosquitto_conf`, `broker/mosquitto_jwt/`).
"""
