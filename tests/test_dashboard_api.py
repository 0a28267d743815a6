"""The dashboard served over HTTP, driven by gradio_client (tiny random model for speed)."""
from __future__ import annotations

import json
import time

import pytest
from gradio_client import Client

from dashboard import render
from dashboard.service import ModelService
from model import GenerationTrace
from model import recursify
from tests.conftest import tiny_llama
from tests.dashboard_helpers import launch, live_args


@pytest.fixture(scope="module")
def app(smol_tokenizer):
    rec = recursify(tiny_llama(vocab=len(smol_tokenizer)), num_loops=3, lora_rank=4)
    service = ModelService.from_model(rec, smol_tokenizer, "tiny random recursive model")
    demo, url = launch(service)
    yield service, Client(url, verbose=False)
    demo.close()


def trace_of(result) -> GenerationTrace:
    path = result[7]  # the State output is not part of the API
    return GenerationTrace.from_dict(json.load(open(path)))


def test_every_event_has_an_api_name(app):
    _, client = app
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert {"/generate", "/token_details", "/compare", "/sweep", "/load_model"} <= names


@pytest.mark.parametrize("policy,threshold", [("confidence", 0.0), ("fixed", 0.5), ("saturation", 0.2)])
def test_generate_colours_and_counters_agree_with_the_trace(app, policy, threshold):
    _, client = app
    result = client.predict(*live_args(policy_v=policy, threshold_v=threshold, depth_v=2), api_name="/generate")
    highlighted, counters_html = result[0], result[1]
    trace = trace_of(result)
    assert trace.settings["policy"] == policy and trace.settings["max_new_tokens"] == 8
    assert len(highlighted) == len(trace.steps) >= 1
    for item, step in zip(highlighted, trace.steps):
        assert item["class_or_confidence"] == render.depth_label(step.depth)
    if policy == "confidence":
        assert {s.depth for s in trace.steps} == {1}  # threshold 0 stops every token after loop 1
    if policy == "fixed":
        assert {s.depth for s in trace.steps} == {2}
    totals = trace.totals()
    assert f"{totals['avg_depth']:.2f} / 3" in counters_html
    assert f"{totals['block_flops_saved_pct']:.1f}%" in counters_html
    assert "finish reason" in result[8]


def test_token_details_show_per_loop_signals(app):
    service, client = app
    result = client.predict(*live_args(policy_v="confidence", threshold_v=1.0), api_name="/generate")
    trace = trace_of(result)
    html = render.token_details(trace, 0)
    assert "top-5 candidates" in html and html.count("<tr>") == 1 + 3  # header + three loops


@pytest.mark.parametrize("override,message", [  # gradio's own bounds checks or ours: both clear
    (dict(prompt_v="   "), "prompt is empty"),
    (dict(threshold_v=1.5), "greater than maximum value 1.0"),
    (dict(threshold_v=-0.5), "threshold must be between 0.0 and 1"),
    (dict(max_new_v=10_000), "greater than maximum value 256"),
    (dict(max_loops_v=9), "greater than maximum value 3"),
    (dict(policy_v="halting"), "halting heads"),
    (dict(kv_v="teleport"), "teleport"),
])
def test_bad_input_gets_a_clear_message_and_no_stack_trace(app, override, message):
    _, client = app
    with pytest.raises(Exception) as info:
        client.predict(*live_args(**override), api_name="/generate")
    text = str(info.value)
    assert message in text and "Traceback" not in text and 'File "' not in text


def test_over_long_prompt_is_truncated_not_rejected(app):
    _, client = app
    result = client.predict(*live_args(prompt_v="word " * 3000, max_new_v=2), api_name="/generate")
    trace = trace_of(result)
    assert trace.prompt_tokens <= 1024 + 64 and len(trace.steps) >= 1


def test_compare_runs_the_columns_and_reports_quality(app):
    _, client = app
    cols = [True, "fixed", 0.5, 3, True, "fixed", 0.5, 1, True, "confidence", 0.0, 1, False, "saturation", 0.9, 1]
    result = client.predict("Hello there", 6, *cols, api_name="/compare")
    texts, counters = result[:4], result[4:8]
    assert all(len(t) >= 1 for t in texts[:3]) and texts[3] == []
    assert "agreement <b>1.00</b> at 100% compute" in counters[0]  # full depth agrees with itself
    assert all("3 loops" == t["class_or_confidence"] for t in texts[0])
    assert all("1 loop" == t["class_or_confidence"] for t in texts[1])
    assert result[9] == "Done." and result[10] == [] and "disabled" in result[11]  # the teacher column is off


def test_the_teacher_as_a_compare_column(app):
    """The original SmolLM2 beside the recursive model: its greedy answer, and how often it would have said
    each token of the model's full-depth answer (teacher-forced); on its own greedy answer exactly all."""
    service, client = app
    cols = [True, "fixed", 0.5, 3, True, "fixed", 0.5, 1, False, "confidence", 0.0, 1, False, "saturation", 0.9, 1]
    result = client.predict("What is the capital of France?", 8, *cols, True, api_name="/compare")
    assert result[10] and all(t["class_or_confidence"] == "1 loop" for t in result[10])
    assert "the teacher's top-1 choice for" in result[11]
    assert len(result[10]) == len(service.teacher_answer("What is the capital of France?", 8).steps)
    assert 0.0 <= float(result[11].split("<b>")[1].split("</b>")[0]) <= 1.0
    own = service.teacher_answer("What is the capital of France?", 8, repetition_penalty=1.0)  # pure greedy
    assert service.teacher_agreement("What is the capital of France?", [s.token_id for s in own.steps]) == 1.0


def test_sweep_returns_pareto_figures(app):
    _, client = app
    result = client.predict("The quick brown fox jumps over the lazy dog. " * 3, "confidence", "max_prob",
                            "confidence", 0.5, 1, "max_prob", 3, api_name="/sweep")
    assert "thresholds of confidence" in result[2] and "current setting" in result[2]
    fig = json.loads(result[0]["plot"])
    names = [d.get("name", "") for d in fig["data"]]
    assert any("fixed depth" in n for n in names) and any(n.startswith("current") for n in names)


def test_loading_an_unknown_model_is_a_clear_error(app):
    _, client = app
    with pytest.raises(Exception, match="not available here"):
        client.predict("/no/such/checkpoint", api_name="/load_model")


class SlowStream:
    """The service's real stream, 20 ms per token slower: a 256-token answer then takes > 5 s, so the
    cancel below always arrives mid-generation (the tiny model alone can finish before it does)."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        for step in self.inner:
            time.sleep(0.02)
            yield step

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_client_that_goes_away_stops_its_generation(app, monkeypatch):
    service, client = app
    real_start = service.start
    monkeypatch.setattr(service, "start", lambda *a, **k: SlowStream(real_start(*a, **k)))
    before = service.generations_started
    job = client.submit(*live_args(max_new_v=256, policy_v="fixed", depth_v=3), api_name="/generate")
    deadline = time.time() + 60
    while service.generations_started == before and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    job.cancel()
    deadline = time.time() + 30
    while service.last_finish_reason != "cancelled" and time.time() < deadline:
        time.sleep(0.1)
    assert service.last_finish_reason == "cancelled"


def test_routed_kv_mode_and_adaptive_policy_through_the_app(app):
    service, client = app
    result = client.predict(*live_args(policy_v="fixed", depth_v=1, kv_v="recursion"), api_name="/generate")
    trace = trace_of(result)
    assert trace.totals()["kv_saved_pct"] > 0  # depth-1 tokens hold no KV in loops 2 and 3
    kv_fig = json.loads(result[5]["plot"])
    assert len([d for d in kv_fig["data"] if d["type"] == "heatmap"]) == 3
    first = client.predict(*live_args(policy_v="adaptive", threshold_v=0.9), api_name="/generate")
    assert trace_of(first).settings["policy"] == "adaptive"
    with pytest.raises(Exception, match="router"):
        client.predict(*live_args(policy_v="router", threshold_v=0.0), api_name="/generate")


def test_live_through_the_shared_batching_engine_matches_a_solo_run(app):
    _, client = app
    solo = trace_of(client.predict(*live_args(policy_v="fixed", depth_v=2, max_new_v=6), api_name="/generate"))
    shared = trace_of(client.predict(*live_args(policy_v="fixed", depth_v=2, max_new_v=6, shared_v=True),
                                     api_name="/generate"))
    assert shared.settings.get("engine") == "shared cdb"
    assert [s.token_id for s in shared.steps] == [s.token_id for s in solo.steps]
    assert [s.depth for s in shared.steps] == [2] * len(solo.steps)


@pytest.mark.parametrize("kv", ["recursion", "share", "copy"])
def test_the_default_live_run_goes_through_the_shared_engine_with_token_details(app, kv):
    """Every policy and KV mode runs on the shared engine, with the top-5 candidates of every loop."""
    _, client = app
    fields = dict(policy_v="confidence", threshold_v=0.01, max_new_v=6, kv_v=kv)
    args = live_args(**fields)[:-1]  # the "share batches" box left at its default
    shared = trace_of(client.predict(*args, api_name="/generate"))
    solo = trace_of(client.predict(*live_args(**fields, shared_v=False), api_name="/generate"))
    assert shared.settings.get("engine") == "shared cdb" and shared.settings["kv_mode"] == kv
    assert [(s.token_id, s.depth) for s in shared.steps] == [(s.token_id, s.depth) for s in solo.steps]
    assert all(sig.top_tokens for s in shared.steps for sig in s.loops)


def test_batching_lab_runs_the_strategies_and_draws_their_schedules(app):
    _, client = app
    result = client.predict(3, 4, 0, ["static", "cdb"], "fixed", 0.5, 1, "max_prob", 3, "sync",
                            api_name="/batching_lab")
    table = result[0]
    rows = table["data"] if isinstance(table, dict) else table
    assert [r[0] for r in rows] == ["static", "cdb"]
    gantt = json.loads(result[1]["plot"])
    assert gantt["data"][0]["type"] == "heatmap" and len(gantt["data"][0]["y"]) == 3
    assert "agreement" in result[-1]


def test_router_sweep_needs_a_routed_model(app):
    _, client = app
    with pytest.raises(Exception, match="no routers"):
        client.predict("The quick brown fox jumps over the lazy dog.", "router", "max_prob",
                       "confidence", 0.5, 1, "max_prob", 3, api_name="/sweep")


def test_a_downloaded_trace_replays_every_live_view_without_a_model(app, tmp_path):
    from gradio_client import handle_file

    _, client = app
    live = client.predict(*live_args(max_new_v=6), api_name="/generate")
    replayed = client.predict(handle_file(live[7]), api_name="/replay_trace")  # [7]: the trace file (States are not in the API)
    assert replayed[0]["value"] == live[0]  # the coloured tokens (an update that also sets the colours)
    assert replayed[1] == live[1] and "Replayed" in replayed[7]  # the counters, the status line
    assert [json.loads(replayed[i]["plot"]) == json.loads(live[i]["plot"]) for i in range(2, 7)] == [True] * 5
    assert replayed[-3:] == ("", None, None)  # an earlier run's ghost line and files do not stay beside the replay
    bad = tmp_path / "not-a-trace.json"
    bad.write_text('{"prompt": "hi", "steps": "many"}')
    with pytest.raises(Exception, match="not a trace"):
        client.predict(handle_file(str(bad)), api_name="/replay_trace")
    bad.write_text("{not json")
    with pytest.raises(Exception, match="not JSON"):
        client.predict(handle_file(str(bad)), api_name="/replay_trace")


def test_a_share_file_puts_the_run_back_into_the_live_inputs(app, tmp_path):
    from gradio_client import handle_file

    _, client = app
    live = client.predict(*live_args(policy_v="saturation", threshold_v=0.8, max_new_v=5, seed_v=7, kv_v="copy"),
                          api_name="/generate")
    share = json.load(open(live[10]))
    assert share["model"] == "tiny random recursive model" and share["settings"]["kv_mode"] == "copy"
    values = client.predict(handle_file(live[10]), api_name="/load_share")
    assert values[0] == "Hello there" and values[2:4] == ("saturation", 0.8) and values[7] == "copy"
    assert values[12] == 7 and "Loaded the settings" in values[13]
    again = client.predict(*values[:13], False, False, api_name="/generate")  # the same run, reproduced
    assert again[0] == live[0]
    bad = tmp_path / "trace.json"
    bad.write_text(open(live[7]).read())
    with pytest.raises(Exception, match="not a share file"):
        client.predict(handle_file(str(bad)), api_name="/load_share")


def test_the_teacher_as_a_ghost_line_in_live(app):
    service, client = app
    result = client.predict(*live_args(max_new_v=6), True, api_name="/generate")  # the last input: the ghost box
    ghost = result[11]
    teacher = service.teacher_answer("Hello there", 6)
    assert "teacher (SmolLM2" in ghost and teacher.text.strip()[:20] in ghost.replace("&#x27;", "'")
    assert "of the answer&#x27;s tokens" in ghost or "of the answer's tokens" in ghost
    assert client.predict(*live_args(max_new_v=3), api_name="/generate")[11] == ""  # off by default


def test_the_threshold_lab_shows_the_adaptive_calibration(app):
    _, client = app
    with pytest.raises(Exception, match="adaptive policy"):
        client.predict("confidence", 0.5, "max_prob", api_name="/threshold_lab")
    with pytest.raises(Exception, match="at least once"):
        client.predict("adaptive", 0.77, "max_prob", api_name="/threshold_lab")
    for prompt in ("Hello there", "Once upon a time", "Tell me a story"):  # each run refits and collects pairs
        client.predict(*live_args(prompt_v=prompt, policy_v="adaptive", threshold_v=0.77, max_new_v=12, kv_v="sync"),
                       api_name="/generate")
    figure, note = client.predict("adaptive", 0.77, "max_prob", api_name="/threshold_lab")
    names = [d.get("name", "") for d in json.loads(figure["plot"])["data"]]
    assert any(n.startswith("consistent (") for n in names) and "threshold per sequence" in names
    assert "consistent and" in note and "threshold" in note
