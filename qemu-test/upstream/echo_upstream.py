"""A stand-in for a real API in the end-to-end tests: an HTTPS server with its own test CA that
records every request it receives (method, path, headers, body) as one JSON line, and answers
200 with a small JSON body. The harness runs it on the host's loopback; the appliance reaches it
through QEMU's user network (10.0.2.2) when its proxy maps a public name to that address."""

import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        record = {
            "method": self.command,
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body": body.decode("utf-8", "replace"),
        }
        with open(self.server.record_path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        answer = json.dumps({"received": len(body)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_POST = do_PUT = _handle

    def log_message(self, *args):
        pass


def main():
    host, port, cert, key, record_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    server = ThreadingHTTPServer((host, port), Recorder)
    server.record_path = record_path
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
