"""What the bridge keeps: the database and the files under the data dir. Nothing else touches either.

`store` (the one storage API: `Store`, and the `Transaction` a claim or a refresh reads and writes in; all SQL),
`database` (the seam under it: what an engine gives `Store`), `sqlite` and `postgres` (the two engines: a file in
the data dir, the default, or a PostgreSQL database bridges share), `migrations` and `pg_migrations` (the versioned
schema, the same numbered steps for each engine), `copy` (a SQLite database into PostgreSQL, verified row for row),
`readonly` (the doctor's read-only view), `records` (the rows as plain data), `keyfiles` (key rings, secrets, the
published JWKS and cloud key), `rotation` (key rotation and the live key ring), `sharedfiles` (on PostgreSQL, the
key files and bridge secret shared by several hosts, sealed in the database), `statefiles` (the denylist, the
bridge's recorded sessions), `filelock` (flock).
"""
