"""The null responder: the floor under provbridge's numbers.

    python -m bench.echo --port 1883 --data-dir DIR --reply-bytes 1400

Subscribes to `{prefix}/claim/+` with the bridge's own account (username `provbridge-bridge`,
password from `<data_dir>/bridge.secret`, so the broker's ACL treats it exactly like the bridge) and
answers every claim with a reply of the same size as the bridge's answers on `{prefix}/res/{client_id}`,
QoS 1, through the same broker and the same client library. Everything the bridge does beyond this
(validation, key lookup, ECDH/HKDF, sealing, signing, the SQLite transaction, the events it publishes)
is what provbridge costs on top of the floor.

It does the least a responder can: one thread, the reply published from the message callback, the
request_id read with one `json.loads` (the load generator matches answers by it).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import set_nodelay
from provwire import topics


def reply_for(request_id: str, size: int) -> bytes:
    """`{"request_id":…,"status":"echo","pad":"xxx…"}`, padded to `size` bytes when it is shorter."""
    head = json.dumps({"request_id": request_id, "status": "echo", "pad": ""}, separators=(",", ":"))
    pad = max(0, size - len(head.encode("utf-8")))
    return head[:-2].encode("utf-8") + b"x" * pad + b'"}'


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--prefix", default=topics.DEFAULT_PREFIX)
    p.add_argument("--data-dir", type=Path, required=True, help="holds bridge.secret")
    p.add_argument("--username", default="provbridge-bridge")
    p.add_argument("--client-id", default="provbridge-bench-echo")
    p.add_argument("--reply-bytes", type=int, default=1400, help="size of each reply (match the bridge's answers)")
    args = p.parse_args(argv)

    password = (args.data_dir / "bridge.secret").read_text().strip()
    claim_head = f"{args.prefix}/claim/"
    stop = threading.Event()
    answered = 0

    def on_connect(client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            print(f"echo: broker refused: {reason}", file=sys.stderr)
            stop.set()
            client.disconnect()
            return
        client.subscribe(topics.claim_subscription(args.prefix), qos=1)

    def on_message(client: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        nonlocal answered
        client_id = message.topic[len(claim_head) :] if message.topic.startswith(claim_head) else ""
        if not topics.is_valid_client_id(client_id):
            return
        try:
            request_id = json.loads(message.payload)["request_id"]
        except (ValueError, KeyError, TypeError):
            request_id = "unknown"
        if not isinstance(request_id, str):
            request_id = "unknown"
        client.publish(topics.response_topic(args.prefix, client_id), reply_for(request_id, args.reply_bytes), qos=1)
        answered += 1

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=args.client_id, protocol=mqtt.MQTTv311)
    client.username_pw_set(args.username, password)
    client.max_inflight_messages_set(65535)
    client.max_queued_messages_set(0)
    client.on_socket_open = set_nodelay
    client.on_connect = on_connect
    client.on_message = on_message

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()
        client.disconnect()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    client.connect(args.host, args.port, keepalive=60)
    # loop_forever returns after disconnect(); retry_first_connection is off, so a refused broker ends it.
    client.loop_forever()
    print(f"echo: answered {answered} claims", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
