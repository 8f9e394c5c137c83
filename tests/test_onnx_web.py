"""The ONNX export in a browser: Debian's Chromium (driven by playwright) loads model.onnx and
model.int8.onnx with onnxruntime-web's WebAssembly backend from a loopback HTTP server, and gives
our logits (float32) and onnxruntime's own (int8).

Skips, naming the reason, when /usr/bin/chromium, playwright, npm or onnxruntime-web is missing
(tests/node/install-onnxruntime-web installs onnxruntime-web into a cache folder once; `.ci/run`
runs it ahead of the tests)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import random_run
from tinygpt.config import get_preset
from tinygpt.export import export_run
from tinygpt.tokenizer import CharTokenizer
from web_helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    ONNXRUNTIME_WEB_VERSION,
    Unavailable,
    browser_logits,
    make_site,
    onnxruntime_web_dist,
    relative_difference,
    serve,
)

if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# test_export.py's text and sizes: every character kind, 2- to 4-byte UTF-8
TEXT = "ROMEO: Hello, world! Ça va? naïve café 😀🎉\nJULIET: "
CHARS = sorted(set(TEXT + "abcdefghijklmnopqrstuvwxyz .,!?\n"))
BLOCK = 16
SIZES = dict(block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
# the cpu preset's options (rotary, pre-LN, ReLU², no biases, untied), and learned positions, tied
CPU_PRESET_OPTIONS = {**dataclasses.asdict(get_preset("cpu")[0]), **SIZES}
# float32: test_export.py's bar for onnxruntime, kept: measured in Chromium at most 9.3e-6 here and
# 1.2e-5 on three windows of a trained 3.2M-parameter run (logits up to 12.5), where Python
# onnxruntime differs by 3.5e-6 and 1.0e-5: float rounding in other kernels, well inside the bar.
FP32_TOLERANCE = 1e-4
# int8 against Python onnxruntime running the same file as written (graph optimizations off; its
# default fuses the quantize-matmul-dequantize steps into kernels of its own). Both runtimes do the
# integer matrix products exactly, but a scale (max - min) / 255 may differ by one float ulp, and an
# activation on a rounding edge then moves by one int8 step; through attention that reaches every
# later position. So not 1e-4 everywhere: the logits must be much nearer Python's int8 ones than
# int8's own change from float32 is. Measured (relative L2 difference, web vs Python int8, over
# int8 vs float32): 4e-6 on these test models (max difference 9.5e-7: no step moved); on three
# windows of a trained 3.2M-parameter run 1e-5, 0.09 and 0.18 (max 0.045), argmax always equal.
INT8_SHARE_OF_QUANTIZATION = 0.25


def exact_int8_products() -> bool:
    """Whether Python onnxruntime's int8 matrix products are exact on this CPU. On an x86 CPU
    without VNNI (AVX2 only, as an AMD EPYC of family 25 model 1, a Zen 3, shows), onnxruntime's
    documentation says its u8s8 kernels (VPMADDUBSW) may saturate, and there its int8 logits
    were as far from the browser's as from float32: there only the argmax is compared."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "avx512_vnni" in flags or "avx_vnni" in flags


@pytest.fixture(scope="module")
def onnxruntime_web():
    try:
        return onnxruntime_web_dist()
    except Unavailable as reason:
        pytest.skip(str(reason))


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.mark.parametrize("options", [CPU_PRESET_OPTIONS, dict(positions="learned", tie_embeddings=True)],
                         ids=["cpu-preset-rotary", "learned-tied"])
def test_onnxruntime_web_in_chromium_gives_our_logits_and_onnxruntimes_int8_ones(tmp_path, onnxruntime_web, browser,
                                                                                options):
    tokenizer = CharTokenizer(CHARS)
    model = random_run(tmp_path / "run", tokenizer, SIZES, seed=0, **options)
    export_run(tmp_path / "run", tmp_path / "export", format="onnx", int8=True)
    site = make_site(tmp_path / "site", tmp_path / "export", onnxruntime_web)
    ids = tokenizer.encode((TEXT * 2)[:BLOCK])
    lengths = (1, 5, BLOCK)
    jobs = [("/model/model.onnx", ids[:length]) for length in lengths] + [("/model/model.int8.onnx", ids)]

    with serve(site) as url:
        version, (*web_fp32, web_int8) = browser_logits(browser, url, jobs)

    assert version == ONNXRUNTIME_WEB_VERSION
    for length, web in zip(lengths, web_fp32, strict=True):
        with torch.no_grad():
            ours = model(torch.tensor([ids[:length]]))[0][0].numpy()  # (T, V)
        assert web.shape == ours.shape == (length, len(CHARS))
        assert np.abs(web - ours).max() < FP32_TOLERANCE

    as_written = ort.SessionOptions()
    as_written.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    python_int8 = ort.InferenceSession(tmp_path / "export" / "model.int8.onnx", as_written).run(
        None, {"input_ids": np.array([ids])})[0][0]
    assert web_int8.shape == python_int8.shape
    # the int8 file really ran (float32 logits would be as far from Python's int8 ones as int8 is)
    quantization = relative_difference(web_fp32[-1], python_int8)
    assert quantization > 1e-3
    assert relative_difference(web_int8, web_fp32[-1]) > 1e-3  # int8 ran in the browser too
    if exact_int8_products():
        assert relative_difference(web_int8, python_int8) < INT8_SHARE_OF_QUANTIZATION * quantization
    assert (web_int8.argmax(-1) == python_int8.argmax(-1)).mean() >= 0.9
