"""TLS: the private CA, the broker's certificate, and who connects where (`certificates`);
the device CA and the client certificates it signs for devices, their topic scope inside (`device_ca`)."""
