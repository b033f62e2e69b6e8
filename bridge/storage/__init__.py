"""What the bridge keeps: the SQLite database and the files under the data dir.

`store` (the database: `Store`, every write in one transaction), `readonly` (the doctor's read-only
view), `migrations` (the versioned schema), `records` (the rows as plain data), `keyfiles` (key rings,
secrets, JWKS), `rotation` (key rotation and the live key ring), `filelock` (flock helpers).
"""
