"""The OpenAI-compatible server: the real `openai` client, raw HTTP errors, 64 concurrent streams."""
from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import httpx
import pytest
import torch

from model import generate
from model import recursify
from model.serving import BatchEngine, EngineWorker, Request
from model.inference.policies import FixedDepth
from model.serving.server import ServerLimits, StopTrimmer, create_app
from tests.conftest import serve_in_thread as _serve, tiny_llama

import openai  # noqa: E402  (pinned in requirements.txt)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(smol_tokenizer):
    tok = smol_tokenizer
    rec = recursify(tiny_llama(vocab=len(tok)), num_loops=3, lora_rank=8)
    worker = EngineWorker(BatchEngine(rec, tok, max_requests=16, max_queue=64, keep_log=False),
                          max_pending=80).start()
    app = create_app(worker, tok, "tiny-recursive", ServerLimits(max_tokens=400), {"policy": "fixed", "depth": 3})
    srv, thread, url = _serve(app)
    yield SimpleNamespace(url=url, worker=worker, rec=rec, tok=tok)
    srv.should_exit = True
    thread.join(10)
    worker.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def expected(server, prompt, n=8, chat=False):
    return generate(server.rec, server.tok, prompt, policy=FixedDepth(3), max_new_tokens=n, chat=chat).text


def test_completions_with_the_openai_client(server, client):
    out = client.completions.create(model="tiny-recursive", prompt="The capital of France is", max_tokens=8,
                                    temperature=0)
    assert out.choices[0].text == expected(server, "The capital of France is")
    assert out.usage.completion_tokens == len(out.choices[0].model_extra["depths"]) <= 8
    assert set(out.choices[0].model_extra["depths"]) <= {3}


def test_chat_with_the_openai_client(server, client):
    out = client.chat.completions.create(model="tiny-recursive", max_tokens=8, temperature=0,
                                         messages=[{"role": "user", "content": "Say hello"}])
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected(server, "Say hello", chat=True)


def test_streaming_with_the_openai_client_carries_depths(server, client):
    chunks = list(client.completions.create(model="tiny-recursive", prompt="Once upon a time", max_tokens=8,
                                            temperature=0, stream=True))
    text = "".join(c.choices[0].text for c in chunks)
    assert text == expected(server, "Once upon a time")
    depths = [c.choices[0].model_extra.get("depth") for c in chunks if c.choices[0].finish_reason is None]
    assert depths and all(d == 3 for d in depths)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    chat = list(client.chat.completions.create(model="tiny-recursive", max_tokens=8, temperature=0, stream=True,
                                               messages=[{"role": "user", "content": "Say hello"}]))
    assert chat[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat) == expected(server, "Say hello", chat=True)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-recursive"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["strategy"] == "cdb" and health["loops"] == 3


@pytest.mark.parametrize("body,status,param", [
    ({"model": "tiny-recursive", "prompt": "   "}, 400, "prompt"),
    ({"model": "tiny-recursive", "prompt": "word " * 600}, 400, "prompt"),
    ({"model": "tiny-recursive", "prompt": "hi", "temperature": -1}, 400, None),
    ({"model": "tiny-recursive", "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "tiny-recursive", "prompt": "hi", "n": 3}, 400, "n"),
    ({"model": "tiny-recursive", "prompt": "hi", "policy": "oracle"}, 400, "policy"),
    ({"model": "gpt-17", "prompt": "hi"}, 404, "model"),
    ({"model": "tiny-recursive"}, 422, "prompt"),
    ({"model": "tiny-recursive", "prompt": "hi", "max_tokens": "many"}, 422, "max_tokens"),
])
def test_bad_requests_get_clear_json_errors(server, body, status, param):
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and "Traceback" not in r.text and (param is None or err["param"] == param)


def test_unknown_route_and_bad_chat_are_json_errors(server):
    r = httpx.get(server.url + "/v2/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny-recursive", "messages": []})
    assert r.status_code == 400
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": "tiny-recursive", "messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 422
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()


def test_full_queue_answers_429(smol_tokenizer):
    rec = recursify(tiny_llama(vocab=len(smol_tokenizer)), num_loops=2)
    worker = EngineWorker(BatchEngine(rec, smol_tokenizer, max_requests=1, max_queue=1), max_pending=1)  # not started
    worker.submit(Request(prompt_ids=[1, 2, 3], max_new_tokens=4))  # fills it
    srv, thread, url = _serve(create_app(worker, smol_tokenizer, "tiny"))
    try:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi"})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    finally:
        srv.should_exit = True
        thread.join(10)


def test_disconnect_cancels_the_request(server):
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions",
                         json={"model": "tiny-recursive", "prompt": "Count to a thousand", "max_tokens": 400,
                               "temperature": 0, "stream": True}) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            rid = json.loads(first[6:])["id"].removeprefix("cmpl-")
    deadline = time.time() + 20
    while rid not in server.worker.engine.results and time.time() < deadline:
        time.sleep(0.05)
    result = server.worker.engine.results[rid]
    assert result.finish_reason == "cancelled" and len(result.token_ids) < 400


def test_64_concurrent_streams_are_never_mixed(server):
    prompts = [f"Request {i}: tell me about the number {i * 7}" for i in range(64)]
    want = [expected(server, p, n=6) for p in prompts]

    async def one(http: httpx.AsyncClient, i: int) -> tuple[str, set]:
        text, ids = "", set()
        async with http.stream("POST", server.url + "/v1/completions",
                               json={"model": "tiny-recursive", "prompt": prompts[i], "max_tokens": 6,
                                     "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    ids.add(chunk["id"])
                    text += chunk["choices"][0]["text"]
        return text, ids

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as http:
            return await asyncio.gather(*(one(http, i) for i in range(64)))

    got = asyncio.run(main())
    assert [t for t, _ in got] == want
    assert all(len(ids) == 1 for _, ids in got) and len({next(iter(ids)) for _, ids in got}) == 64


def test_stop_strings_are_trimmed_across_pieces():
    t = StopTrimmer(["END"])
    sent = t.feed("hello E") + t.feed("N") + t.feed("D and more")
    assert sent + t.finish() == "hello "
    t = StopTrimmer([])
    assert t.feed("a") + t.feed("b") + t.finish() == "ab"
