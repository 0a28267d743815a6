"""Browser tests: Debian's headless Chromium driven by Playwright against the served app.

By default the app serves a tiny random recursive model (fast, CI). ``LAB_BROWSER_MODEL=<label>``
serves a real model instead (e.g. the dashboard's default) and ``LAB_SCREENSHOTS=assets/screenshots``
keeps the screenshots (that is how the README's screenshots are made).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dashboard.service import ModelService
from model import recursify
from tests.conftest import tiny_llama
from tests.dashboard_helpers import launch

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian chromium (.ci/setup --test)")
REAL = os.environ.get("LAB_BROWSER_MODEL")
TIMEOUT_MS = 600_000 if REAL else 90_000


@pytest.fixture(scope="module")
def app_url(smol_tokenizer):
    if REAL:
        service = ModelService()
        service.load_best() if REAL == "best" else service.load(REAL)
    else:
        rec = recursify(tiny_llama(vocab=len(smol_tokenizer)), num_loops=3, lora_rank=4)
        service = ModelService.from_model(rec, smol_tokenizer, "tiny random recursive model (test)")
    demo, url = launch(service)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def page(app_url, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(app_url)
        page.wait_for_selector("#run")
        yield page
        browser.close()


def shoot(page, name: str, tmp_path_factory=None) -> Path:
    target = Path(os.environ.get("LAB_SCREENSHOTS", "")) if os.environ.get("LAB_SCREENSHOTS") else None
    path = Path(f"/tmp/lab-{name}.png")
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    if target:
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / f"{name}.png")
    return path


def wait_text(page, selector: str, text: str) -> None:
    page.wait_for_function(
        "([s, t]) => { const e = document.querySelector(s); return e && e.innerText.includes(t); }",
        arg=[selector, text], timeout=TIMEOUT_MS)


def test_live_tab_streams_coloured_tokens_plots_and_details(page):
    page.fill("#prompt textarea", "What is the capital of France, and why is it famous?")
    page.click("#run")
    wait_text(page, "#status", "finish reason")
    tokens = page.locator("#tokens .token")
    assert tokens.count() >= 1
    colours = {tokens.nth(i).evaluate("e => getComputedStyle(e).backgroundColor") for i in range(min(tokens.count(), 20))}
    assert colours and all(c not in ("rgba(0, 0, 0, 0)", "transparent") for c in colours)
    assert page.locator("#depth-plot .js-plotly-plot").count() == 1
    assert page.locator("#heatmap .js-plotly-plot").count() == 1
    assert "average depth" in page.inner_text("#counters").lower()
    tokens.first.click()
    wait_text(page, "#token-details", "top-5 candidates")
    assert "exit:" in page.inner_text("#token-details")
    assert page.locator("#trace-file a, #trace-file .file-preview, #trace-file").count() >= 1
    shoot(page, "live")


def test_compare_tab_runs_four_columns(page):
    page.get_by_role("tab", name="Compare").click()
    page.check("#cmp-teacher input[type=checkbox]")  # the teacher as a fifth column
    page.click("#cmp-run")
    wait_text(page, "#cmp-plot", "Quality vs compute")
    wait_text(page, "#cmp-teacher-quality", "the teacher's top-1 choice")
    page.wait_for_function("() => [...document.querySelectorAll('.cmp-text')].filter("
                           "e => e.querySelector('.token')).length >= 4", timeout=TIMEOUT_MS)
    assert page.locator("#cmp-plot .js-plotly-plot").count() == 1
    assert page.locator("text=teacher-forced agreement").count() >= 4
    heights = page.eval_on_selector_all(".cmp-text", "els => els.map(e => Math.round(e.getBoundingClientRect().height))")
    assert len(heights) == 5 and len(set(heights)) == 1  # the answers (and the teacher's) in boxes of one height
    shoot(page, "compare")


def test_sweep_tab_plots_the_pareto_view(page):
    page.get_by_role("tab", name="Sweep").click()
    page.click("#sweep-run")
    wait_text(page, "#sweep-plot", "fixed depth")
    assert page.locator("#sweep-ppl .js-plotly-plot").count() == 1
    shoot(page, "sweep")


def test_batching_lab_draws_measured_schedules(page):
    page.get_by_role("tab", name="Batching lab").click()
    page.click("#lab-run")
    wait_text(page, "#lab-table", "cdb")
    page.wait_for_selector("#lab-gantt-3 .js-plotly-plot", timeout=TIMEOUT_MS)
    assert "static" in page.inner_text("#lab-table")
    shoot(page, "batching")


def test_model_tab_describes_the_loaded_model(page):
    page.get_by_role("tab", name="Model").click()
    wait_text(page, "#model-card", "unique parameters")
    assert page.locator("#layout .pos").count() >= 3
    shoot(page, "model")


def test_bad_input_shows_a_message_not_a_stack_trace(page):
    page.get_by_role("tab", name="Live").click()
    page.fill("#prompt textarea", "   ")
    page.click("#run")
    page.wait_for_selector("text=prompt is empty", timeout=TIMEOUT_MS)
    body = page.inner_text("body")
    assert "Traceback" not in body and 'File "' not in body


def test_a_trace_file_replays_in_the_live_tab(page, smol_tokenizer, tmp_path):
    from model import generate
    from model.inference.policies import Confidence

    rec = recursify(tiny_llama(vocab=len(smol_tokenizer), seed=5), num_loops=2, lora_rank=4)
    trace = generate(rec, smol_tokenizer, "Replay me", policy=Confidence(0.01), max_new_tokens=5, inspect=True,
                     model_name="another model")
    path = tmp_path / "trace.json"
    path.write_text(__import__("json").dumps(trace.to_dict()))
    page.get_by_role("tab", name="Live").click()
    page.click("#replay .label-wrap")
    page.set_input_files("#replay-file input[type=file]", str(path))
    page.click("#replay-run")
    wait_text(page, "#status", "Replayed a trace of another model")
    assert page.locator("#tokens .token").count() == len(trace.steps)
    assert "2 loops" in page.inner_text("#legend")
    shoot(page, "replay")


def test_the_threshold_lab_draws_the_adaptive_mixture(page):
    import time

    page.get_by_role("tab", name="Live").click()
    page.click("#threshold-lab .label-wrap")
    page.click("#threshold-run")
    page.wait_for_selector("text=for the adaptive policy", timeout=TIMEOUT_MS)  # a clear message first
    page.click("#policy input")
    page.get_by_role("option", name="adaptive", exact=True).click()
    assert page.input_value("#policy input") == "adaptive"
    page.fill("#prompt textarea", "Once upon a time, in a land far away")
    page.click("#run")
    deadline = time.time() + TIMEOUT_MS / 1000  # the run registers the adaptive policy; then the lab draws it
    while "pairs" not in page.inner_text("#threshold-note") and time.time() < deadline:
        time.sleep(1.0)
        page.click("#threshold-run")
    assert "pairs" in page.inner_text("#threshold-note")
    assert page.locator("#threshold-plot .js-plotly-plot").count() == 1
    shoot(page, "threshold-lab")
