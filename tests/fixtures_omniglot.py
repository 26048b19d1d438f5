"""Test helpers: tiny Omniglot archives in the authors' exact layout, and a local HTTP server.

The archives hold ``images_<subset>/<alphabet>/characterNN/<id>_<drawer>.png`` with 20
105x105 1-bit PNGs of random strokes per character, directory entries included, like the
authors' zips; they are a few kilobytes, so tests stay fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import socket
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from metajax.data.omniglot import DRAWINGS, SOURCE_SIZE, OmniglotFile

# Character counts per alphabet: background 3 alphabets / 7 characters, evaluation 2 / 4.
# Alphabets are written out of order, so that a loader which does not sort shows it.
LAYOUT = {
    "background": {"Gamma": 2, "Alpha_(Test)": 2, "Beta": 3},
    "evaluation": {"Epsilon": 2, "Delta": 2},
}


def drawing(rng: np.random.Generator) -> Image.Image:
    """A 105x105 1-bit image, white paper with a few black strokes (as in Omniglot)."""
    image = Image.new("1", (SOURCE_SIZE, SOURCE_SIZE), 1)
    pen = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 5))):
        points = [tuple(int(v) for v in rng.integers(5, 100, size=2)) for _ in range(3)]
        pen.line(points, fill=0, width=int(rng.integers(2, 5)))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def build_zip(
    subset: str, alphabets: dict[str, int], *, seed: int = 0, first_id: int = 1
) -> tuple[bytes, dict[str, bytes]]:
    """(zip bytes, member path -> PNG bytes) for ``alphabets`` (name -> character count)."""
    rng = np.random.default_rng(seed)
    top = f"images_{subset}"
    pngs: dict[str, bytes] = {}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{top}/", b"")
        char_id = first_id
        for alphabet, count in alphabets.items():
            archive.writestr(f"{top}/{alphabet}/", b"")
            for number in range(1, count + 1):
                folder = f"{top}/{alphabet}/character{number:02d}"
                archive.writestr(f"{folder}/", b"")
                for drawer in range(1, DRAWINGS + 1):
                    name = f"{folder}/{char_id:04d}_{drawer:02d}.png"
                    pngs[name] = png_bytes(drawing(rng))
                    archive.writestr(name, pngs[name])
                char_id += 1
    return buffer.getvalue(), pngs


def spec_for(subset: str, data: bytes, alphabets: dict[str, int]) -> OmniglotFile:
    """An :class:`OmniglotFile` entry that names ``data`` as the original archive."""
    return OmniglotFile(
        f"images_{subset}.zip",
        hashlib.sha256(data).hexdigest(),
        len(data),
        len(alphabets),
        sum(alphabets.values()),
    )


def make_fixture(seed: int = 0) -> dict[str, tuple[bytes, dict[str, bytes], OmniglotFile]]:
    """subset -> (zip bytes, member PNGs, spec) for the two subsets of :data:`LAYOUT`."""
    out = {}
    first_id = 1
    for i, (subset, alphabets) in enumerate(LAYOUT.items()):
        data, pngs = build_zip(subset, alphabets, seed=seed + i, first_id=first_id)
        out[subset] = (data, pngs, spec_for(subset, data, alphabets))
        first_id += sum(alphabets.values())
    return out


def write_fixture(folder: Path, fixture: dict) -> None:
    """Write the fixture archives into ``folder`` (``<data_dir>/omniglot``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for data, _, spec in fixture.values():
        (folder / spec.filename).write_bytes(data)


Response = bytes | Callable[[http.server.BaseHTTPRequestHandler], None]


@contextlib.contextmanager
def serve(routes: dict[str, Response]) -> Iterator[str]:
    """A threaded HTTP server on 127.0.0.1 for the test's duration; yields its base URL.

    ``routes`` maps a path (``"/name.zip"``) to the bytes to send, or to a function that
    writes the whole response itself (to simulate errors); other paths get 404. The dict
    may be changed while serving.
    """

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the name http.server looks for)
            response = routes.get(self.path)
            if response is None:
                self.send_error(404)
            elif callable(response):
                response(self)
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(response)))
                self.end_headers()
                self.wfile.write(response)

        def log_message(self, *args) -> None:  # keep test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # A short poll interval makes shutdown() return quickly (default: 0.5 s per test).
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def truncated(data: bytes) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    """A response announcing all of ``data`` but sending only half, then closing."""

    def respond(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data[: len(data) // 2])
        handler.wfile.flush()
        handler.close_connection = True

    return respond


def status(code: int) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    """A response that is only an HTTP error status."""
    return lambda handler: handler.send_error(code)


def closed_port_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"
