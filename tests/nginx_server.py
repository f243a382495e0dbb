"""A real nginx on 127.0.0.1 for the tests, serving a folder (Debian's nginx-light, as COMPONENTS.md runs it).

Beside plain files (with range requests), it serves the faults a downloader meets: ``/fault/500/...``
answers 500, ``/slow/...`` trickles at 1 KB/s, ``/throttled/...`` sends at ``throttle`` per connection (a
slow remote server, for benchmarks), ``/optout/...`` sends ``X-Robots-Tag: noai, noimageai`` and
``/optout-other/...`` an opt-out aimed at another agent only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

CONFIG = """\
{user}daemon off;
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/error.log;
events {{ worker_connections 512; }}
http {{
    access_log {run}/access.log;
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    types {{ image/jpeg jpg jpeg; image/png png; text/html html; application/x-tar tar; }}
    default_type application/octet-stream;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location /fault/500/ {{ return 500; }}
        location /slow/ {{ limit_rate 1k; }}
        location /throttled/ {{ limit_rate {throttle}; }}
        location /optout/ {{ add_header X-Robots-Tag "noai, noimageai"; }}
        location /optout-other/ {{ add_header X-Robots-Tag "otherbot: noai"; }}
    }}
}}
"""


class Nginx:
    """A running nginx: ``root`` is served at ``url``; ``requests(path)`` counts the requests for a path."""

    def __init__(self, throttle: str = "64k") -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise RuntimeError("nginx is not installed (Debian: apt-get install nginx-light)")
        self.base = Path(tempfile.mkdtemp(prefix="lipkit-nginx-"))
        self.base.chmod(0o755)  # nginx's workers read the files (as nobody, unless run as root)
        self.root, self.run = self.base / "www", self.base / "run"
        self.root.mkdir(mode=0o755)
        self.run.mkdir(mode=0o755)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        user = "user root root;\n" if os.geteuid() == 0 else ""
        conf = self.run / "nginx.conf"
        conf.write_text(CONFIG.format(user=user, run=self.run, root=self.root, port=self.port, throttle=throttle))
        self.process = subprocess.Popen(
            [binary, "-p", str(self.run), "-c", str(conf), "-e", str(self.run / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"nginx did not start: {(self.run / 'error.log').read_text()}") from None
                time.sleep(0.05)

    def put(self, relative: str, data: bytes) -> str:
        """Serve ``data`` at ``relative``; returns its URL."""
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        for parent in path.relative_to(self.root).parents:
            (self.root / parent).chmod(0o755)
        path.write_bytes(data)
        path.chmod(0o644)
        return f"{self.url}/{relative}"

    def requests(self, relative: str) -> int:
        """How many requests for ``/relative`` the access log holds so far."""
        log = self.run / "access.log"
        return sum(f" /{relative} " in line for line in log.read_text().splitlines()) if log.exists() else 0

    def stop(self) -> None:
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.base, ignore_errors=True)
