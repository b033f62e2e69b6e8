"""What operators do: `admin` (init, tenants, keys, ops users), `devices` (list, update, API keys),
`lifecycle` (revoke, reinstate, reset, delete; the denylist), `doctor`."""
