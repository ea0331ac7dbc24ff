"""docs/tracking.md's own sink, installed from the page with pip, and an HTTP service for it to post to (one that
can go away mid-run)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "tracking.md"


def install_webhook_sink(package: Path, site: Path) -> Path:
    """The page's python and toml blocks as a package, pip-installed into ``site`` (no build isolation: nothing
    is downloaded at test time)."""
    text = DOC.read_text()
    (package / "dschat_webhook.py").write_text(re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)[0])
    (package / "pyproject.toml").write_text(re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)[0])
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--target", str(site), str(package)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return site


class Receiver:
    """Collects the posts; with ``die_after_step``, shuts down (connections refused) once that step arrives."""

    def __init__(self, die_after_step: int | None = None) -> None:
        self.posts: list[dict] = []
        self.authorization: set[str] = set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.posts.append(body)
                receiver.authorization.add(self.headers.get("Authorization", ""))
                self.send_response(200)
                self.end_headers()
                if die_after_step is not None and body.get("step", 0) >= die_after_step:
                    threading.Thread(target=receiver.stop, daemon=True).start()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/points"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.stopped = False

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.server.shutdown()
            self.server.server_close()

    def points(self) -> dict[int, dict[str, float]]:
        """Each step's values (a step's training and evaluation points come in separate posts)."""
        merged: dict[int, dict[str, float]] = {}
        for post in self.posts:
            if "step" in post:
                merged.setdefault(post["step"], {}).update(post["values"])
        return merged
