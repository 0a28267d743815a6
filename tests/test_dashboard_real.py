"""One run of the dashboard on the real default model, over HTTP with gradio_client."""
from __future__ import annotations

import json

import pytest
from gradio_client import Client

from dashboard import render
from dashboard.service import ModelService
from model import GenerationTrace
from tests.dashboard_helpers import launch, live_args


@pytest.mark.timeout(900)
def test_real_default_streams_depths_that_match_its_trace():
    service = ModelService()
    loaded = service.load_best()  # the trained default when it can be built, else a conversion
    demo, url = launch(service)
    try:
        client = Client(url, verbose=False)
        n = loaded.num_loops
        result = client.predict(*live_args(prompt_v="What is the capital of France?", max_loops_v=n,
                                           policy_v="confidence", threshold_v=0.6, max_new_v=6),
                                api_name="/generate")
        trace = GenerationTrace.from_dict(json.load(open(result[7])))
        assert trace.model["num_loops"] == n and 1 <= len(trace.steps) <= 6
        assert [h["class_or_confidence"] for h in result[0]] == [render.depth_label(s.depth) for s in trace.steps]
        assert all(1 <= s.depth <= n and s.loops[-1].max_prob is not None for s in trace.steps)
        assert f"{trace.totals()['avg_depth']:.2f} / {n}" in result[1]
    finally:
        demo.close()


@pytest.mark.timeout(1800)
def test_real_default_lab_features_over_http(tmp_path):
    """Issue 16's lab features once on the real default: the teacher (Compare column and Live ghost line),
    where the time goes, replaying a downloaded trace, a share file reproducing the run, the threshold lab."""
    from gradio_client import handle_file

    service = ModelService()
    loaded = service.load_best()
    demo, url = launch(service)
    try:
        client = Client(url, verbose=False)
        n = loaded.num_loops
        args = live_args(prompt_v="What is the capital of France?", max_loops_v=n, policy_v="adaptive",
                         threshold_v=0.9, kv_v="sync", max_new_v=8)
        live = client.predict(*args, True, api_name="/generate")  # the teacher's ghost line on
        assert "teacher (SmolLM2" in live[11] and "Paris" in live[11]  # the teacher knows the capital
        time_names = {d.get("name") for d in json.loads(live[12]["plot"])["data"]}
        assert {"block loops", "exit decisions"} <= time_names, time_names
        replayed = client.predict(handle_file(live[7]), api_name="/replay_trace")
        assert replayed[0]["value"] == live[0] and "Replayed" in replayed[7]
        values = client.predict(handle_file(live[10]), api_name="/load_share")
        assert values[0] == "What is the capital of France?" and values[2] == "adaptive"
        figure, note = client.predict("adaptive", 0.9, "max_prob", api_name="/threshold_lab")
        assert "threshold" in note and json.loads(figure["plot"])["data"]
        cols = [True, "fixed", 0.5, n, True, "fixed", 0.5, 1, False, "confidence", 0.5, 1, False, "saturation", 0.9, 1]
        result = client.predict("What is the capital of France?", 8, *cols, True, api_name="/compare")
        assert "Paris" in "".join(t["token"] for t in result[10]) and "the teacher's top-1 choice for" in result[11]
    finally:
        demo.close()
