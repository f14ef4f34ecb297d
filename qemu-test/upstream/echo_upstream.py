"""A stand-in for a real API in the end-to-end tests: an HTTPS server with its own test CA that
records every request it receives (method, path, headers, body) as one JSON line, and answers
200 with a small JSON body. The harness runs it on the host's loopback; the appliance reaches it
through QEMU's user network (10.0.2.2) when its proxy maps a public name to that address.

Echo mode, for the sealing proxy's response scrubbing: a request whose path starts with /echo
(recorded like any other) is answered the way real APIs' error pages quote what they received:
a JSON body quoting the whole request, the x-api-key header in an X-Echo-Key response header
and in the reason phrase, and percent-encoded in the body. `?encoding=gzip` gzips the body
(Content-Encoding: gzip); `?chunked=1` sends it chunked in 7-byte pieces, so quoted values
straddle chunk boundaries."""

import gzip
import json
import ssl
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Small enough that every quoted secret spans several chunks.
CHUNK = 7


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
        if self.path.startswith("/echo"):
            self._echo(record)
            return
        answer = json.dumps({"received": len(body)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def _echo(self, record):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        key = self.headers.get("x-api-key") or ""
        quoted = dict(record, key_percent_encoded=urllib.parse.quote(key, safe=""))
        answer = json.dumps({"error": {"type": "echo", "request": quoted}}).encode()
        gzipped = query.get("encoding") == ["gzip"]
        chunked = query.get("chunked") == ["1"]
        if gzipped:
            answer = gzip.compress(answer)
        # A hostile upstream quotes the key in the status line and a header too.
        self.send_response(200, "Echoed " + key if key else "Echoed")
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Echo-Key", key)
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        if not chunked:
            self.wfile.write(answer)
            return
        for start in range(0, len(answer), CHUNK):
            piece = answer[start : start + CHUNK]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

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
