"""The Convert tab in Debian's headless Chromium: convert a tiny base, save it, open it in Live, generate.

With ``LAB_BROWSER_MODEL`` set (see tests/test_browser.py) it converts the embedded SmolLM2 instead
(activation-aware LoRA), which is how the README's Convert screenshot is made."""
from __future__ import annotations

from pathlib import Path

import pytest

from dashboard.service import ModelService
from model import recursify
from tests.conftest import tiny_llama
from tests.dashboard_helpers import launch
from tests.test_browser import CHROMIUM, FLAGS, REAL, shoot, wait_text

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian chromium (.ci/setup --test)")
TIMEOUT_MS = 900_000 if REAL else 90_000


@pytest.fixture(scope="module")
def page(smol_tokenizer, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    rec = recursify(tiny_llama(vocab=len(smol_tokenizer)), num_loops=3, lora_rank=4)
    service = ModelService.from_model(rec, smol_tokenizer, "tiny random recursive model (test)")
    service.checkpoint_roots = [tmp_path_factory.mktemp("runs")]
    if not REAL:  # the first base offered: the tiny one here, the embedded SmolLM2 otherwise
        service.converter().add_base("tiny base", tiny_llama(layers=6, vocab=len(smol_tokenizer)), smol_tokenizer)
    demo, url = launch(service)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_selector("#run")
        yield page
        browser.close()
    demo.close()


def test_convert_save_open_in_live_and_generate(page):
    page.get_by_role("tab", name="Convert").click()
    if REAL:
        page.get_by_label("asvd").check()
    page.click("#cv-run")
    wait_text(page, "#cv-status", "Converted")
    wait_text(page, "#cv-report", "held-out perplexity")
    page.wait_for_selector("#cv-error .js-plotly-plot")
    page.wait_for_selector("#cv-energy .js-plotly-plot")
    assert page.locator("#cv-layers .pos").count() == (30 if REAL else 6)  # 3 loops x 10, or x 2 (tiny base)
    shoot(page, "convert")
    page.fill("#cv-name input, #cv-name textarea", "browser-conv")
    page.click("#cv-save")
    wait_text(page, "#cv-status", "Saved to")
    page.click("#cv-open")
    wait_text(page, "#model-note", "browser-conv")
    assert page.locator("#run").is_visible()  # Open in Live switched to the Live tab
    page.click("#run")
    wait_text(page, "#status", "finish reason")
    body = page.inner_text("body")
    assert "Traceback" not in body


def test_bad_rank_shows_a_message(page):
    page.get_by_role("tab", name="Convert").click()
    page.locator("#cv-rank input").fill("lots")
    page.locator("#cv-rank input").press("Enter")
    page.click("#cv-run")
    page.wait_for_selector("text=LoRA rank must be", timeout=TIMEOUT_MS)
    assert "Traceback" not in page.inner_text("body")
