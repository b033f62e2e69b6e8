"""Claims and token refreshes, from a device's message to its answer.

`provisioning` (parse, read, decide, apply: `ClaimPreparer` for the work before the write lock,
`Provisioner` for the rest), `decision` (the pure `decide`), `refresh` and `refresh_decision` (the same
for token refreshes), `credentials` (the token and the sealed answer), `mirror` (how a broker is told of
a token), `ratelimit` (flood limits), `hardware_pattern` (RE2 patterns), `identifiers` (keys, codes and
ids: made and hashed).
"""
