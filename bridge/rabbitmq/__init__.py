"""RabbitMQ as a clustered external broker: configuration and install (issue 13)."""
