"""Shared fixtures: tiny random Llama models (fast) and the real SmolLM2 default (session-cached)."""
from __future__ import annotations

import os
import random
import socket
import threading
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model.inference.policies import DepthPolicy

# Exactness tests compare against transformers in fp32: no automatic bf16 / compile choice in tests
# (model.inference.numerics; tests/test_numerics.py asks for the choice explicitly). Subprocesses inherit it.
os.environ["LAB_NUMERICS"] = "fp32"


def tiny_llama(layers: int = 6, vocab: int = 256, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random 64-wide Llama (GQA: 4 query heads, 2 KV heads); builds in milliseconds."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=512, eos_token_id=2, bos_token_id=1, **overrides)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms so that per-position norms matter in the tests
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    return model


def serve_in_thread(app):
    """Run an ASGI app with uvicorn on a free loopback port in a daemon thread: ``(server, thread, url)``;
    stop it with ``server.should_exit = True; thread.join()``."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started, "the test server did not start"
    return server, thread, f"http://127.0.0.1:{port}"


class RandomExits(DepthPolicy):
    """Exits after each loop with probability ``p`` (seeded): exercises every KV path."""

    name = "random"

    def __init__(self, p: float = 0.5, seed: int = 0):
        self.p, self.rng = p, random.Random(seed)

    def decide(self, obs):
        if obs.loop >= obs.max_loops:
            return True, "max depth"
        return self.rng.random() < self.p, "random"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (on a busy 2-core machine two threads made
    them several times slower); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smol_tokenizer():
    from model import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer) of the real embedded SmolLM2-135M-Instruct."""
    from model import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def tiny_vocab_llama(smol_tokenizer):
    """A tiny random Llama with SmolLM2's vocabulary, so the real tokenizer drives it."""
    return tiny_llama(vocab=len(smol_tokenizer))
