"""Helpers shared by the pairs data-layer and scoring tests: a loopback HTTP server with misbehaving
endpoints, real CIFAR-10 JPEGs as pair files, webdataset shards, tiny saved Hugging Face models."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pandas as pd
from conftest import CIFAR10
from tiny_models import save_tiny_clip, save_tiny_siglip  # noqa: F401 (the pairs and scoring tests' models)

CLASSES = sorted(p.name for p in (CIFAR10 / "test").iterdir()) if (CIFAR10 / "test").is_dir() else []


def cifar_pairs(count: int) -> pd.DataFrame:
    """``count`` real CIFAR-10 test JPEGs, spread over the classes, captioned with their class."""
    files = sorted((CIFAR10 / "test").glob("*/*.jpg"))
    step = max(1, len(files) // count)
    picked = files[::step][:count]
    return pd.DataFrame(
        {
            "id": [f"pair{i:05d}" for i in range(len(picked))],
            "image": [str(p) for p in picked],
            "caption": [f"a photo of a {p.parent.name}" for p in picked],
        }
    )


def write_shards(pairs: pd.DataFrame, folder: Path, per_shard: int) -> str:
    """img2dataset's layout: NNNNN.tar with <key>.jpg, <key>.txt, <key>.json (its key and caption)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = 0
    for start in range(0, len(pairs), per_shard):
        with tarfile.open(folder / f"{shards:05d}.tar", "w") as tar:
            for i, row in pairs.iloc[start : start + per_shard].iterrows():
                key = f"{i:09d}"
                members = {
                    "jpg": Path(row["image"]).read_bytes(),
                    "txt": row["caption"].encode(),
                    "json": json.dumps({"key": key, "id": row["id"]}).encode(),
                }
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards += 1
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


# ------------------------------------------------------------------------------------ HTTP server
class Endpoints(BaseHTTPRequestHandler):
    """Misbehaving image URLs. ``hits`` counts requests per path (to check retries)."""

    image = b""
    hits: ClassVar[Counter] = Counter()
    cap = 0  # the byte cap the tests configure; "big" endpoints exceed it

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        Endpoints.hits[path] += 1
        if path == "/ok.jpg":
            self._send(200, self.image)
        elif path == "/slow.jpg":
            time.sleep(1.5)  # longer than the read timeout
            self._send(200, self.image)
        elif path == "/trickle.jpg":  # bytes keep coming, each within the read timeout, the whole too late
            self.send_response(200)
            self.end_headers()
            for _ in range(20):
                self.wfile.write(b"x" * 10)
                self.wfile.flush()
                time.sleep(0.1)
        elif path == "/big-declared.jpg":
            self._send(200, b"x" * (self.cap + 1))
        elif path == "/big-streamed.jpg":  # no Content-Length: the cap is found while reading
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"x" * (self.cap + 1))
        elif path == "/missing.jpg":
            self._send(404, b"not found")
        elif path == "/error.jpg":
            self._send(500, b"boom")
        elif path == "/flaky.jpg":  # fails once, then serves the image
            self._send(503) if Endpoints.hits[path] == 1 else self._send(200, self.image)
        elif path == "/redirect.jpg":
            self._send(302, headers={"Location": "/ok.jpg"})
        elif path == "/loop.jpg":
            self._send(302, headers={"Location": "/loop.jpg"})
        elif path == "/to-ftp.jpg":
            self._send(302, headers={"Location": "ftp://127.0.0.1/image.jpg"})
        else:
            self._send(404)


def serve(image: bytes, cap: int):
    """A running loopback server; returns (base URL, server). Stop it with ``server.shutdown()``."""
    Endpoints.image, Endpoints.cap = image, cap
    Endpoints.hits = Counter()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoints)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server
