"""The playground page in a real browser: Debian's Chromium driven by playwright.

Skips when /usr/bin/chromium or the playwright package is missing (`.ci/run` installs
Chromium with apt-get; playwright's own browser download is never used)."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_helpers import live_server, trained_run
from tinygpt.serve import Limits, create_app

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    # a short time slice: the page receives the characters in many small pieces, as a person would see them
    app = create_app(trained_run(tmp_path_factory), device="cpu", limits=Limits(time_slice=0.002))
    with live_server(app) as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(url)
            yield page
        finally:
            browser.close()


def test_generates_inspects_and_shows_attention(page, tmp_path):
    page.wait_for_selector("#model-info:has-text('parameters')")
    page.fill("#prompt", "To be")
    page.fill("#length", "120")
    page.fill("#seed", "3")
    page.press("#prompt", "Control+Enter")  # the keyboard shortcut starts the generation

    page.wait_for_function("document.querySelectorAll('#output .ch').length >= 10")
    page.wait_for_selector("#generate:not([disabled])")
    assert "120 characters" in page.inner_text("#status")
    assert page.eval_on_selector_all("#output .ch", "spans => spans.length") == 120
    assert page.text_content("#output").startswith("To be")
    colours = page.eval_on_selector_all("#output .ch", "spans => spans.map(s => getComputedStyle(s).backgroundColor)")
    probabilities = page.eval_on_selector_all("#output .ch", "spans => spans.map(s => Number(s.dataset.prob))")
    assert all(0 < p <= 1 for p in probabilities)
    assert len(set(colours)) > 5 and "rgba(0, 0, 0, 0)" not in colours  # every character tinted, by its probability

    page.hover("#output .ch[data-index='7']")  # hovering shows the top-5 alternatives
    assert page.is_visible("#tooltip")
    assert page.eval_on_selector_all("#tooltip li", "items => items.length") == 5

    page.focus("#output")  # the keyboard reaches every character: End, then one step back
    page.keyboard.press("End")
    page.keyboard.press("ArrowLeft")
    assert page.get_attribute("#output .ch.selected", "data-index") == "118"
    assert "Character 119" in page.inner_text("#details")
    assert page.eval_on_selector_all("#details li", "items => items.length") == 5

    page.click("#toggle-attention")
    assert page.get_attribute("#toggle-attention", "aria-expanded") == "true"
    page.wait_for_selector("#heatmap .cell")
    weights = page.eval_on_selector_all("#heatmap .cell", "cells => cells.map(c => Number(c.dataset.weight))")
    assert len(weights) == 32 and sum(weights) == pytest.approx(1, abs=0.01)  # the context window, one row
    page.select_option("#layer", index=0)
    page.select_option("#head", index=2)  # after "all (mean)": head 2
    assert "Layer 1, head 2" in page.inner_text("#attention-caption")
    other = page.eval_on_selector_all("#heatmap .cell", "cells => cells.map(c => Number(c.dataset.weight))")
    assert other != weights and sum(other) == pytest.approx(1, abs=0.01)

    screenshot = tmp_path / "playground.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000

    page.set_viewport_size({"width": 390, "height": 844})  # a phone: one column, nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(tmp_path / "playground-phone.png"), full_page=True)


def test_shows_the_servers_error(page):
    page.fill("#prompt", "Zebra")
    page.click("#generate")
    page.wait_for_selector("#status.error")
    assert "'Z'" in page.inner_text("#status")


def test_a_bpe_model_streams_coloured_tokens_and_whole_characters(page, tmp_path):
    import torch

    from helpers import MIXED_TEXT
    from tinygpt.config import ModelConfig
    from tinygpt.model import GPT
    from tinygpt.tokenizer import train_bpe

    tokenizer = train_bpe(iter([MIXED_TEXT * 20]), 300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16,
                            dropout=0.0)).eval()
    app = create_app(tmp_path, device="cpu", model=model, tokenizer=tokenizer, limits=Limits(time_slice=0.002))
    with live_server(app) as url:
        bpe_page = page.context.browser.new_page(viewport={"width": 1200, "height": 900})  # playwright runs once
        try:
            bpe_page.set_default_timeout(30_000)
            bpe_page.goto(url)
            bpe_page.wait_for_selector("#model-info:has-text('byte-level BPE of 300 tokens')")
            bpe_page.fill("#prompt", "Ωμέγα 😀 ")  # no char vocabulary has these: a BPE encodes any text
            bpe_page.fill("#length", "40")
            bpe_page.click("#generate")
            bpe_page.wait_for_selector("#generate:not([disabled])")
            assert "40 tokens" in bpe_page.inner_text("#status")
            assert bpe_page.eval_on_selector_all("#output .ch", "spans => spans.length") == 40  # a span per token
            text = bpe_page.text_content("#output")
            assert text.startswith("Ωμέγα 😀 ")
            # the page's text is what the server's tokens decode to: whole characters, no stray surrogates
            assert text.encode("utf-16", "surrogatepass").decode("utf-16") == text
        finally:
            bpe_page.close()


def test_the_page_asks_for_the_api_key_once(page, tmp_path_factory):
    app = create_app(trained_run(tmp_path_factory), device="cpu", limits=Limits(time_slice=0.002),
                     api_key="open sesame")
    with live_server(app) as url:
        keyed = page.context.browser.new_page(viewport={"width": 1200, "height": 900})  # playwright runs once
        try:
            keyed.set_default_timeout(30_000)
            keyed.goto(url)
            keyed.wait_for_selector("#key-form:not([hidden])")  # /api/info answered 401
            assert "needs its API key" in keyed.inner_text("#key-message")
            keyed.fill("#api-key", "open sesam")
            keyed.click("#key-form button")
            keyed.wait_for_selector("#key-message:has-text('refused')")
            keyed.fill("#api-key", "open sesame")
            keyed.press("#api-key", "Enter")
            keyed.wait_for_selector("#model-info:has-text('parameters')")
            assert keyed.is_hidden("#key-form")
            assert keyed.evaluate("sessionStorage.getItem('tinygpt-api-key')") == "open sesame"
            keyed.reload()  # the same tab: the key is kept, not asked again
            keyed.wait_for_selector("#model-info:has-text('parameters')")
            keyed.fill("#prompt", "To be")
            keyed.fill("#length", "20")
            keyed.click("#generate")
            keyed.wait_for_selector("#generate:not([disabled])")
            assert "20 characters" in keyed.inner_text("#status") and keyed.is_hidden("#key-form")
        finally:
            keyed.close()
