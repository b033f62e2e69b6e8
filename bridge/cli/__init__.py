"""`provbridge`: `main` (parser, errors, exit codes, `doctor`) and one module per group of commands:
`run` (init, serve, broker, mosquitto-config), `admin` (tenant, key, device, events), `ops` (ops-user),
`tls`, `keys` (cloud-key, jwks, keys), and `common` (what they share)."""
