"""The ONNX export in a browser: how far onnxruntime-web's logits (WebAssembly, one thread, in
Debian's Chromium) are from tinyGPT's (float32) and from Python onnxruntime's (int8), on one
window of block_size validation tokens of a trained run.

    .venv/bin/python benchmarks/onnx_web.py runs/tokenizers/run-char --data runs/tokenizers/data-char

Needs what tests/test_onnx_web.py needs: /usr/bin/chromium, playwright, npm (onnxruntime-web is
installed into the cache folder by tests/node/install-onnxruntime-web). Python onnxruntime runs
the int8 file twice: as written (graph optimizations off) and with its default fusions.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from tinygpt.checkpoint import best_or_last, load_model  # noqa: E402
from tinygpt.data import load_tokens  # noqa: E402
from tinygpt.export import export_run  # noqa: E402
from web_helpers import (  # noqa: E402
    CHROMIUM,
    CHROMIUM_ARGS,
    Unavailable,
    browser_logits,
    make_site,
    onnxruntime_web_dist,
    relative_difference,
    rows_within,
    serve,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="the run's data folder (its val split is used)")
    parser.add_argument("--offset", type=int, default=0, help="where in the val split the window starts")
    args = parser.parse_args()

    import onnxruntime as ort
    from playwright import sync_api

    try:
        dist = onnxruntime_web_dist()
    except Unavailable as reason:
        sys.exit(str(reason))
    if not CHROMIUM.exists():
        sys.exit(f"no {CHROMIUM}")
    model, _ = load_model(args.run, best_or_last(args.run))
    model.eval()
    block = model.config.block_size
    ids = [int(i) for i in load_tokens(args.data, "val")[args.offset:args.offset + block]]

    with tempfile.TemporaryDirectory() as tmp:
        export = Path(tmp) / "export"
        export_run(args.run, export, format="onnx", int8=True)
        site = make_site(Path(tmp) / "site", export, dist)
        with sync_api.sync_playwright() as playwright, serve(site) as url:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                version, (web_fp32, web_int8) = browser_logits(
                    browser, url, [("/model/model.onnx", ids), ("/model/model.int8.onnx", ids)])
            finally:
                browser.close()
        as_written = ort.SessionOptions()
        as_written.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        feed = {"input_ids": np.array([ids])}
        python_fp32 = ort.InferenceSession(export / "model.onnx").run(None, feed)[0][0]
        python_int8 = ort.InferenceSession(export / "model.int8.onnx", as_written).run(None, feed)[0][0]
        fused_int8 = ort.InferenceSession(export / "model.int8.onnx").run(None, feed)[0][0]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()  # (T, V)

    def row(name: str, a: np.ndarray, b: np.ndarray) -> str:
        return (f"| {name} | {np.abs(a - b).max():.2g} | {rows_within(a, b, 1e-4):.1%} | "
                f"{relative_difference(a, b):.2g} | {(a.argmax(-1) == b.argmax(-1)).mean():.1%} |")

    print(f"onnxruntime-web {version} (wasm, 1 thread), onnxruntime {ort.__version__}; "
          f"{model.num_parameters():,} parameters, {len(ids)} tokens, largest |logit| {np.abs(ours).max():.1f}\n")
    print("| compared | max abs difference | positions within 1e-4 | relative (L2) | same argmax |")
    print("|---|---|---|---|---|")
    print(row("float32: onnxruntime-web vs tinyGPT", web_fp32, ours))
    print(row("float32: Python onnxruntime vs tinyGPT", python_fp32, ours))
    print(row("int8: onnxruntime-web vs Python onnxruntime, as written", web_int8, python_int8))
    print(row("int8: onnxruntime-web vs Python onnxruntime, fused (default)", web_int8, fused_int8))
    print(row("int8 (as written) vs float32 (tinyGPT)", python_int8, ours))


if __name__ == "__main__":
    main()
