# The provbridge image: the bridge, the admin CLI and the simulator.
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 provbridge
WORKDIR /app
COPY pyproject.toml README.md ./
COPY provwire ./provwire
COPY bridge ./bridge
COPY broker ./broker
COPY device_sim ./device_sim
COPY config ./config
RUN pip install --no-cache-dir .
# Owned by the service user, so named volumes mounted here start out writable by it.
RUN mkdir -p /data /mosquitto-config && chown provbridge:provbridge /data /mosquitto-config
USER provbridge
ENV PROVBRIDGE_DATA_DIR=/data
VOLUME /data
EXPOSE 1883
# init's first key would land in the container log, which Docker keeps: discard it, and create keys
# with `docker compose exec bridge provbridge key create ...` (printed to your terminal only).
CMD ["sh", "-c", "provbridge init > /dev/null && exec provbridge serve"]
