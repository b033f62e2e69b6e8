"""TLS: the private CA, the broker's certificate, and who connects where (`certificates`)."""
