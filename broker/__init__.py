"""The embedded MQTT broker of provbridge: amqtt 0.12.1, hardened, with provbridge's roles as its ACL.

    from broker.embedded import EmbeddedBrokerSettings, start_embedded_broker, stop_embedded_broker

    broker = await start_embedded_broker(EmbeddedBrokerSettings(data_dir=Path("data")))
    ...
    await stop_embedded_broker(broker)

or `run_broker_forever(settings)` to block until SIGINT/SIGTERM.

Modules: `acl` (topic matching and the role rules, pure), `auth` (CONNECT decisions),
`tokens` (JWKS and device-token verification), `plugin` (the amqtt plugin), `server` (the
amqtt Broker subclass and why it exists), `embedded` (settings and lifecycle).

Nothing is imported here, so `broker.acl` stays usable without loading amqtt.
"""
