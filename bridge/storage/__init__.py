"""What the bridge keeps: the database and the files under the data dir. Nothing else touches either.

`store` (the database: `Store`, and the `Transaction` a claim or a refresh reads and writes in; all SQL),
`readonly` (the doctor's read-only view), `migrations` (the versioned schema), `records` (the rows as
plain data), `keyfiles` (key rings, secrets, the published JWKS and cloud key), `rotation` (key rotation
and the live key ring), `statefiles` (the denylist, the bridge's recorded sessions), `filelock` (flock).
"""
