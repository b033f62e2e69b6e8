"""The provbridge service: validates claims, creates devices, seals credentials, mints tokens."""
