"""Shared fixtures: a local HTTP server with byte ranges, for URL sources (no network needed)."""
import functools
import http.server
import os
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_data  # noqa: E402


class RangeHandler(bench_data.RangeHandler):
    """bench_data's server, and: no byte ranges when the server's `ranges` is off (as some servers answer), /moved/PATH
    redirects to /PATH, requests counted."""

    def do_GET(self):
        self.server.requests += 1
        if self.path.startswith('/moved/'):  # as a CDN or a hub answers: elsewhere
            self.send_response(302)
            self.send_header('Location', self.path[len('/moved'):])
            self.send_header('Content-Length', '0')
            self.end_headers()
            return
        if not self.server.ranges:
            del self.headers['Range']
        super().do_GET()


@pytest.fixture
def http_server(tmp_path):
    """(base URL, served folder, server): files under the folder are at URL/...; server.requests counts GETs."""
    root = tmp_path / 'served'
    root.mkdir()
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(RangeHandler, directory=str(root)))
    server.requests, server.ranges, server.delay = 0, True, 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_address[1]}', root, server
    server.shutdown()
    server.server_close()
