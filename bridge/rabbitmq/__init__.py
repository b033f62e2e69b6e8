"""Everything specific to a RabbitMQ 3.10 cluster as the broker (`broker.mode = "rabbitmq"`).

`conf` (what every node gets, as pure functions: rabbitmq.conf lines, definitions, plugins), `files` (`provbridge
rabbitmq-config`), `management` (the management API: ending a revoked device's connections), and
`install-rabbitmq.sh` (what `make rabbitmq` runs). The edge is `bridge.edges.rabbitmq`; topics as routing keys and
token scopes are `bridge.rabbitmq_scopes`.
"""
