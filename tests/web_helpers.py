"""onnxruntime-web in Chromium, for tests/test_onnx_web.py and benchmarks/onnx_web.py: install it,
serve it with an export folder from a loopback HTTP server, and run tests/node/onnx_web_check.mjs
in a page. No pytest here: the callers decide what a missing piece means (skip, or a message)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

NODE = Path(__file__).resolve().parent / "node"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ONNXRUNTIME_WEB_VERSION = (NODE / "install-onnxruntime-web").read_text().split("version=", 1)[1].split()[0]


class Unavailable(Exception):
    """Something the browser check needs is not on this machine; the message says what."""


def onnxruntime_web_dist(timeout: float = 600) -> Path:
    """onnxruntime-web's dist/ folder, installed once into a cache folder by
    tests/node/install-onnxruntime-web."""
    if not shutil.which("npm"):
        raise Unavailable("the browser check needs npm: onnxruntime-web comes from npm")
    try:
        result = subprocess.run(["bash", str(NODE / "install-onnxruntime-web")], capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"installing onnxruntime-web took over {timeout:.0f} s") from None
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no output"]
        reason = next((line for line in lines if line.startswith("npm error code")), lines[-1])  # not "see the log"
        raise Unavailable(f"onnxruntime-web could not be installed ({reason})")
    dist = Path(result.stdout.strip().splitlines()[-1]) / "node_modules" / "onnxruntime-web" / "dist"
    if not (dist / "ort.wasm.min.mjs").is_file():
        raise Unavailable(f"onnxruntime-web's install has no {dist / 'ort.wasm.min.mjs'}")
    return dist


def make_site(site: Path, export_dir: Path, dist: Path) -> Path:
    """The folder the server serves: /model/ (the export), /ort/ (onnxruntime-web's dist/),
    /check/ (tests/node, for onnx_web_check.mjs) and an empty page to run it from."""
    site.mkdir(parents=True, exist_ok=True)
    for name, target in [("model", export_dir), ("ort", dist), ("check", NODE)]:
        (site / name).symlink_to(target.resolve(), target_is_directory=True)
    (site / "index.html").write_text("<!doctype html><title>onnxruntime-web check</title>\n", encoding="utf-8")
    return site


class _Files(http.server.SimpleHTTPRequestHandler):
    # a module script must come with a JavaScript type, and WebAssembly.instantiateStreaming wants
    # application/wasm; neither should depend on the machine's /etc/mime.types
    extensions_map = {".html": "text/html", ".mjs": "text/javascript", ".js": "text/javascript",
                      ".wasm": "application/wasm", ".onnx": "application/octet-stream",
                      ".json": "application/json"}

    def log_message(self, format, *args) -> None:  # the caller's output is not a server log
        pass


@contextlib.contextmanager
def serve(root: Path) -> Iterator[str]:
    """root over HTTP on a free loopback port; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Files, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def browser_logits(browser, url: str, jobs: list[tuple[str, list[int]]]) -> tuple[str, list[np.ndarray]]:
    """onnx_web_check.mjs's logits() in a fresh page of a playwright browser, for each
    (model path on the server, ids): onnxruntime-web's version and each job's (T, V) logits."""
    page = browser.new_page()
    page.set_default_timeout(120_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(f"{url}/index.html")
        results = page.evaluate("""async (jobs) => {
            const check = await import("/check/onnx_web_check.mjs");
            const results = [];
            for (const [model, ids] of jobs) results.push(await check.logits(model, ids));
            return results;
        }""", [list(job) for job in jobs])
    finally:
        page.close()
    if errors:
        raise RuntimeError(f"the page raised: {errors}")
    versions = {result["version"] for result in results}
    if len(versions) != 1:
        raise RuntimeError(f"more than one onnxruntime-web version answered: {versions}")
    return versions.pop(), [np.array(result["data"], dtype=np.float32).reshape(result["dims"])[0]
                            for result in results]


def rows_within(a: np.ndarray, b: np.ndarray, tolerance: float) -> float:
    """The fraction of positions (rows of (T, V) logits) whose every logit differs by < tolerance."""
    return float((np.abs(a - b) < tolerance).all(axis=-1).mean())


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
