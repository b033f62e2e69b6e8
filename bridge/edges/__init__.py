"""Where MQTT meets the claim path, and the processes that run it.

`core` (what every edge shares: routing, the in-flight bound, answers out), `inprocess` (the edge
inside the embedded broker), `external` (the default edge for Mosquitto: paho on the event loop),
`rabbitmq` (the edge on a RabbitMQ cluster: an AMQP consumer of the claim queue), `pipeline` (those two's
claim work: each claim prepared on the event loop before the claim worker writes it), `coalescing` (the Mosquitto
edge's paho connection, read and written in bulk), `paho` (the threaded edge beside the dynamic-security mirror),
`pahoedge` (what `external` and `paho` share), `workerlink` and `claimworker` (the claim-worker process and its
group commit), `processes` and `sessions` (`serve --processes N`), `serve` (`provbridge serve`),
`lifeline` (child processes die with their parent).
"""
