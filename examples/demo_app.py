#!/usr/bin/env python3
"""A minimal app behind kafka-sidecar (single mode). Python 3 standard library only.

The sidecar POSTs one Kafka record per request: the body is the record value, the metadata
is in X-Kafka-* headers (the key is base64). This app logs each record on one line and
answers:

  200  the record is done (the sidecar commits its offset);
  422  the value contains "poison": the sidecar writes the record to the dead-letter topic.

Any other 4xx/5xx would make the sidecar retry the record with backoff.

    python3 examples/demo_app.py --port 8080
"""

import argparse
import base64
import json
import logging
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("demo-app")


def decode_key(header):
    """X-Kafka-Key is base64; absent when the record has no key."""
    if header is None:
        return None
    return base64.b64decode(header).decode("utf-8", errors="replace")


class RecordHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the sidecar reuses its connections

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        value = self.rfile.read(length)
        if self.headers.get("X-Kafka-Value-Null") == "true":
            value = None  # a tombstone

        poison = value is not None and b"poison" in value
        status = 422 if poison else 200
        text = "null" if value is None else value.decode("utf-8", errors="replace")
        log.info(
            "record topic=%s partition=%s offset=%s key=%s attempt=%s status=%d value=%s",
            self.headers.get("X-Kafka-Topic"),
            self.headers.get("X-Kafka-Partition"),
            self.headers.get("X-Kafka-Offset"),
            json.dumps(decode_key(self.headers.get("X-Kafka-Key"))),
            self.headers.get("X-Kafka-Attempt"),
            status,
            text,
        )
        self.answer(status, b"rejected: poison record\n" if poison else b"ok\n")

    def do_GET(self):
        # A health endpoint, handy to wait for the app before starting the sidecar.
        if self.path == "/healthz":
            self.answer(200, b"ok\n")
        else:
            self.answer(404, b"not found\n")

    def answer(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # quiet access log
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080, help="listen port (default 8080)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    args = parser.parse_args()

    logging.basicConfig(
        stream=sys.stdout,
        level=logging.INFO,
        format="%(asctime)s %(message)s",
    )
    server = ThreadingHTTPServer((args.host, args.port), RecordHandler)
    server.daemon_threads = True
    log.info("demo app listening on http://%s:%d/records", args.host, args.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
