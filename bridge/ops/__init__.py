"""What operators do: `admin` (init, tenants, keys, ops users), `devices` (list, update, API keys),
`revocation` (`device revoke`), `doctor`."""
