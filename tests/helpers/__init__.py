"""What the tests share, one concern a module. Test modules import from here, never from each other;
pytest fixtures stay in tests/conftest.py.

- `mqtt.py`: the one MQTT test client, `MqttClient` (3.1.1 or 5; CONNACK, SUBACK and PUBACK codes;
  never reconnects by itself), `can_connect`, `token_session`, `request_properties`, `NOT_AUTHORIZED`.
- `raw_mqtt.py`: MQTT packets as bytes (`packet`, `mqtt_string`, `remaining_length`, `connect_packet`, `read_packet`),
  for what no client library would send.
- `waiting.py`: the one `wait_for` (a condition, a timeout, an interval).
- `network.py`: the one `free_port`, and `accepts_connections`.
- `bridge.py`: the bridge under test: `make_settings`, `Bridge`, `serving`, `serving_bridge`,
  `provision_key_row`.
- `devices.py`: `Device` (a device as firmware would be), `answer_of`, `provision`, `race_one_time_key`.
- `refresh.py`: `RefreshingDevice` (a Device that also refreshes its token), `provisioned`.
- `mosquitto.py`: the one Mosquitto launcher (`RunningMosquitto`, `running_mosquitto`, `mosquitto_for`,
  `mosquitto_bridge`, `external_settings`), `require_mosquitto` and `require_plugin`.
- `brokers.py`: the bridge on each broker kind (`EMBEDDED`, `DYNSEC`, `JWT`): `bridge_on`, `use_jwt_plugin`.
- `mosquitto_checks.py`: checks that hold on Mosquitto in both authentication modes.
- `jwt_harness.py`: the provbridge_jwt plugin's C code driven directly (`bridge/mosquitto/jwt/harness.c`),
  for the differential test against the Python reference.
- `amqtt.py`: `BrokerThread`, an amqtt broker (ours or stock) on its own event loop thread.
- `processes.py`: `provbridge serve` as a subprocess (`ServeProcesses`), `alive`, `terminate`.
- `cli.py`: `run_cli` (the CLI in this process, with the settings as its config file), `config_toml`.
- `api.py`: the admin API in tests (a uvicorn server in a thread, or the one a `serve` subprocess started) and
  `Api`, a plain HTTP client over real sockets.
- `api_process.py`: the admin API in a process of its own, as `serve` starts it, on a bridge's settings.
- `tls.py`: what the TLS tests share: `tls_settings`, `initialise`, `running`.
- `figures.py`: `figure`, the informational `FAULTS ...` lines.
- `credentials.py`: `sample_credentials`, for the simulator's tests without a bridge.
- `strategies.py`: Hypothesis strategies for hostile input, and the `short` / `long` profiles.

tests/vectors.py (regenerates docs/PROTOCOL.md's vectors) and tests/secret_scan.py (`make test` runs it
as `python -m tests.secret_scan`) are scripts with their own entry points and stay where they are.
"""
