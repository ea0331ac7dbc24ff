"""A local HTTP server in the Hugging Face hub's URL layout, enough for huggingface_hub's snapshot downloads:

    GET  /api/{models|datasets}/{repo}/revision/{rev}       repository info (sha, siblings)
    GET  /api/{models|datasets}/{repo}/tree/{sha}?recursive  file listing
    HEAD/GET [/datasets]/{repo}/resolve/{rev}/{path}         file bytes, with Range support

``drop_once`` names files whose first full GET sends half the bytes and then closes the connection, as a
flaky network does; every request is recorded (method, path, Range header)."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
from dataclasses import dataclass, field

SHA = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Hub:
    repos: dict[tuple[str, str], dict[str, bytes]]  # (type "model"|"dataset", repo id) -> path -> bytes
    drop_once: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    url: str = ""


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serve(hub: Hub):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _reply(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            hub.requests.append((self.command, self.path, self.headers.get("Range")))
            path = self.path.split("?")[0]
            api = re.match(r"^/api/(models|datasets)/(.+?)(?:/(revision|tree)/([^/]+))?$", path)
            if api:
                kind, repo, what, _ = api.groups()
                files = hub.repos.get((kind[:-1], repo))
                if files is None:
                    return self._reply(
                        404,
                        b'{"error": "Repository not found"}',
                        {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"},
                    )
                if what != "tree":
                    body = {"id": repo, "sha": SHA, "siblings": [{"rfilename": f} for f in sorted(files)]}
                else:
                    body = [
                        {"type": "file", "path": f, "size": len(d), "oid": _etag(d)[:40]}
                        for f, d in sorted(files.items())
                    ]
                return self._reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
            resolve = re.match(r"^/(datasets/)?(.+?)/resolve/([^/]+)/(.+)$", path)
            if not resolve:
                return self._reply(404)
            kind = "dataset" if resolve.group(1) else "model"
            files = hub.repos.get((kind, resolve.group(2)), {})
            name = resolve.group(4)
            if name not in files:
                return self._reply(404, b"", {"X-Error-Code": "EntryNotFound"})
            data = files[name]
            headers = {
                "X-Repo-Commit": SHA,
                "ETag": f'"{_etag(data)}"',
                "Content-Type": "application/octet-stream",
                "Accept-Ranges": "bytes",
            }
            wanted = self.headers.get("Range")
            if wanted and self.command == "GET":
                start = int(re.match(r"bytes=(\d+)-", wanted).group(1))
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                return self._reply(206, data[start:], headers)
            if self.command == "GET" and name in hub.drop_once:
                hub.drop_once.discard(name)
                self.send_response(200)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return None
            return self._reply(200, data, headers)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hub.url = f"http://127.0.0.1:{server.server_port}"
    return server
