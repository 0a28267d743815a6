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
