"""What operators do: `admin` (init, tenants, keys, ops users), `revocation` (`device revoke`), `doctor`."""
