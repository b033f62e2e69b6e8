"""Where MQTT meets the claim path, and the processes that run it.

`core` (what every edge shares: routing, the in-flight bound, answers out), `inprocess` (the edge
inside the embedded broker), `external` (the default edge for an external broker: paho on the event
loop, each claim prepared there before the claim worker writes it), `coalescing` (that edge's paho
connection, read and written in bulk), `paho` (the threaded edge beside the dynamic-security mirror),
`pahoedge` (what those two share), `workerlink` and `claimworker` (the claim-worker process and its
group commit), `processes` and `sessions` (`serve --processes N`), `serve` (`provbridge serve`),
`lifeline` (child processes die with their parent).
"""
