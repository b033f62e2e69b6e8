"""Where MQTT meets the claim path, and the processes that run it.

`core` (what both edges share: routing, the in-flight bound, answers out), `paho` (the edge for an
external broker), `inprocess` and `claimworker` (the edge inside the embedded broker and its worker
process), `processes` and `sessions` (`serve --processes N`), `serve` (`provbridge serve`),
`lifeline` (child processes die with their parent).
"""
