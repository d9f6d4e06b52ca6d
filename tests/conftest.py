"""Shared fixtures: a local HTTP server with byte ranges, for URL sources (no network needed)."""
import functools
import http.server
import os
import re
import threading

import pytest


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files, with byte ranges unless the server's `ranges` is off (Python's own handler ignores Range, as
    some servers do); /moved/PATH redirects to /PATH; counts the requests it answers."""
    protocol_version = 'HTTP/1.1'  # keep-alive, as object stores serve

    def do_GET(self):
        if self.path.startswith('/moved/'):  # as a CDN or a hub answers: elsewhere
            self.send_response(302)
            self.send_header('Location', self.path[len('/moved'):])
            self.send_header('Content-Length', '0')
            self.end_headers()
            return
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        with open(path, 'rb') as f:
            body = f.read()
        asked = re.fullmatch(r'bytes=(\d+)-(\d+)', self.headers.get('Range', ''))
        if asked and self.server.ranges:
            body = body[int(asked[1]):int(asked[2]) + 1]
            self.send_response(206)
        else:
            self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.server.requests += 1

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(tmp_path):
    """(base URL, served folder, server): files under the folder are at URL/...; server.requests counts GETs."""
    root = tmp_path / 'served'
    root.mkdir()
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(RangeHandler, directory=str(root)))
    server.requests, server.ranges = 0, True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_address[1]}', root, server
    server.shutdown()
    server.server_close()
