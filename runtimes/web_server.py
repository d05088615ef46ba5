"""`d2m-export serve DIR`: a web export's page on 127.0.0.1, as a browser needs it.

- DIR itself at `/` (`/index.html` is the page, beside the model's files);
- the runtime the page imports, from the installed npm packages (`web/node_modules`, `make web`), under
  RUNTIME_PREFIX: transformers.js's browser build (`dist/transformers.min.js`, which bundles onnxruntime-web's
  JavaScript) and onnxruntime-web's `.mjs`/`.wasm` files of the same version; nothing comes from a CDN;
- every response with Cross-Origin-Opener-Policy: same-origin and Cross-Origin-Embedder-Policy: require-corp:
  the page is then cross-origin isolated, which WebAssembly threads (SharedArrayBuffer) need.
"""
from __future__ import annotations

import json
import signal
import sys
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from d2m_export.errors import UserError
from runtimes.base import MANIFEST
from runtimes.transformersjs import WEB_DIR

HOST = "127.0.0.1"
RUNTIME_PREFIX = "/d2m-runtime/"           # web/page/index.html and page.js name these URLs
PAGE = "index.html"
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
                     "Cross-Origin-Resource-Policy": "same-origin"}
MIME = {".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript",
        ".json": "application/json", ".html": "text/html; charset=utf-8", ".onnx": "application/octet-stream"}


def check_web_export(export_dir: Path) -> dict:
    """The export's manifest, or a UserError saying why DIR is not a web export with a page."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise UserError(f"{export_dir} is not a directory")
    path = export_dir / MANIFEST
    if not path.is_file():
        raise UserError(f"{export_dir} is not a web export ({MANIFEST} missing; make one with --target web)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is unreadable ({e})") from None
    target = manifest.get("target") if isinstance(manifest, dict) else None
    if target != "web":
        raise UserError(f"{export_dir} is a {target or 'unnamed'} export, not a web export (--target web)")
    if not (export_dir / PAGE).is_file():
        raise UserError(f"{export_dir} has no {PAGE} (an export older than the page): export it again")
    return manifest


def package_dir(*names: str) -> Path:
    """The first of web/node_modules/<name> that is installed (a nested copy before the hoisted one)."""
    for name in names:
        path = WEB_DIR / "node_modules" / name
        if (path / "package.json").is_file():
            return path
    raise UserError(f"{names[-1]} is not installed in {WEB_DIR.name}/: run make web (npm ci there)")


def runtime_mounts() -> dict[str, Path]:
    """URL prefix -> folder for the runtime's files, from the installed packages."""
    transformers = package_dir("@huggingface/transformers")
    # the onnxruntime-web that transformers.js bundles and was installed with (its own copy when nested)
    ort = package_dir("@huggingface/transformers/node_modules/onnxruntime-web", "onnxruntime-web")
    return {f"{RUNTIME_PREFIX}transformers/": transformers / "dist", f"{RUNTIME_PREFIX}onnxruntime-web/": ort / "dist"}


class PageHandler(SimpleHTTPRequestHandler):
    """Static files from the export folder and the runtime's mounts; no directory listings."""
    mounts: dict[str, Path] = {}
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **MIME}

    def translate_path(self, path: str) -> str:
        for prefix, root in self.mounts.items():
            if path.startswith(prefix):
                directory, self.directory = self.directory, str(root)
                try:                                    # the base class's normalization, rooted at the mount
                    return super().translate_path("/" + path[len(prefix):])
                finally:
                    self.directory = directory
        return super().translate_path(path)

    def list_directory(self, path):
        self.send_error(404, "no directory listings")
        return None

    def end_headers(self) -> None:
        for name, value in ISOLATION_HEADERS.items():
            self.send_header(name, value)
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_request(self, code="-", size="-") -> None:
        if isinstance(code, int) and code >= 400:
            super().log_request(code, size)             # only what went wrong: a page loads many files


class PageServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):     # a closed tab mid-download is not an error
            super().handle_error(request, client_address)


def make_server(export_dir: Path, port: int = 8000) -> PageServer:
    """A bound (not yet serving) server for a checked web export; port 0 takes a free one."""
    export_dir = Path(export_dir).resolve()
    check_web_export(export_dir)
    handler = type("ExportPageHandler", (PageHandler,), {"mounts": runtime_mounts()})
    try:
        return PageServer((HOST, port), partial(handler, directory=str(export_dir)))
    except OSError as e:             # the port is taken (or not ours to bind)
        raise UserError(f"cannot serve on {HOST}:{port} ({e.strerror or e}): choose another --port, or 0 for a "
                        f"free one") from None


def page_url(server: PageServer) -> str:
    return f"http://{HOST}:{server.server_address[1]}/{PAGE}"


def _stop(signum, frame):
    raise KeyboardInterrupt


def serve(export_dir: Path, port: int = 8000) -> int:
    """Serve until Ctrl-C (SIGINT) or SIGTERM; prints the page's URL first."""
    server = make_server(export_dir, port)
    # a process started in the background inherits SIGINT ignored; a server's only way to stop is a signal
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    print(f"serving {export_dir} at {page_url(server)} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    return 0
