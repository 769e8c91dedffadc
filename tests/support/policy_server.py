"""An HTTPS server for MTA-STS policies in tests (RFC 8461 3.3), run as a subprocess.

    python -m tests.support.policy_server --listen 127.0.0.20:0 --cert C --key K --root DIR

Serves GET /.well-known/mta-sts.txt from DIR/<Host header>.txt as text/plain (read
anew for each request, so a test changes a policy by rewriting the file); an absent
file is 404. Every request is a line "HOST PATH" in DIR/requests.log. Prints
"ready PORT" once listening; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import http.server
import signal
import ssl
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.policy_server")
    parser.add_argument("--listen", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--root", required=True, type=Path)
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    root: Path = args.root

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            name = (self.headers.get("Host") or "").partition(":")[0].lower()
            with open(root / "requests.log", "a") as log:
                log.write(f"{name} {self.path}\n")
            policy = root / f"{name}.txt"
            if self.path != "/.well-known/mta-sts.txt" or "/" in name or not policy.is_file():
                self.send_error(404)
                return
            body = policy.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"ready {server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
