"""Solo adaptive generation: sampling settings, ``stream`` / ``generate``, and what a trace says of the model.

``stream(model, tokenizer, prompt, policy=...)`` yields one ``TokenStep`` per generated token (its
``.trace`` grows as it goes); ``generate(...)`` runs it to the end and returns the trace. Each token
is one ``AdaptiveDecoder.step`` (``model.inference.decoder``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from model.inference.compute import CostModel
from model.inference.decoder import AdaptiveDecoder, as_recursive
from model.errors import EngineInputError
from model.definition.modeling import RecursiveForCausalLM
from model.inference.policies import DepthPolicy, FixedDepth
from model.inference.numerics import compiled_runner, model_in, resolve
from model.inference.prompts import encode_prompt
from model.inference.trace import GenerationTrace, TokenStep

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64 bits; JSON clients mostly send int64


@dataclass
class Sampling:
    """Decoding settings. ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if not 0.0 <= self.temperature <= 5.0:
            raise EngineInputError(f"temperature must be in [0, 5], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise EngineInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 1.0 <= self.repetition_penalty <= 3.0:
            raise EngineInputError(f"repetition_penalty must be in [1, 3], got {self.repetition_penalty}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise EngineInputError(f"seed must be an integer in 0..{MAX_SEED}, got {self.seed!r}")

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.temperature > 0:
            procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


class Stream:
    """Iterate to get ``TokenStep``s as they are produced; ``.trace`` holds everything so far."""

    def __init__(self, model, tokenizer, prompt: str, policy: DepthPolicy | None = None,
                 max_new_tokens: int = 64, kv_mode: str = "sync", max_loops: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 seed: int = 0, chat: bool = False, stop: list[str] | None = None, inspect: bool = False,
                 model_name: str | None = None, max_prompt_tokens: int | None = None, numerics=None):
        model = as_recursive(model)
        policy = policy or FixedDepth(model.config.num_loops)
        self.sampling = Sampling(temperature, top_p, repetition_penalty, seed)
        self.sampling.validate()
        if not 1 <= max_new_tokens <= 4096:
            raise EngineInputError(f"max_new_tokens must be in 1..4096, got {max_new_tokens}")
        self.model, self.tokenizer = model, tokenizer
        self.prompt_ids = encode_prompt(tokenizer, prompt, chat)
        limit = max_prompt_tokens or (model.config.max_position_embeddings - max_new_tokens)
        if len(self.prompt_ids) > limit:
            raise EngineInputError(f"the prompt has {len(self.prompt_ids)} tokens; at most {limit} fit")
        # the dtype this machine runs batch-1 decode fastest in (``numerics``; "fp32" forces today's path)
        choice = resolve(model, numerics)
        run_model = model_in(model, choice.dtype_for(1)) if choice is not None else model
        self.decoder = AdaptiveDecoder(run_model, policy, kv_mode, max_loops, inspect, tokenizer)
        if choice is not None and choice.compiled:
            self.decoder.runner = compiled_runner(run_model)
        self.max_new_tokens = max_new_tokens
        self.stop = [s for s in (stop or []) if s]
        self.eos_ids = eos_token_ids(model, tokenizer)
        settings = {**policy.describe(), "kv_mode": kv_mode, "max_loops": self.decoder.max_loops,
                    "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                    "repetition_penalty": repetition_penalty, "seed": seed, "chat": chat,
                    "inspect": inspect, "stop": self.stop}
        self.trace = GenerationTrace(prompt=prompt, prompt_tokens=len(self.prompt_ids), settings=settings,
                                     model=describe_model(run_model, model_name))
        if choice is not None:
            self.trace.numerics = choice.header(run_model.dtype, "solo")
        if model.config.training is None and model.config.num_loops > 1:
            self.trace.notes.append("untrained conversion: early exits of a converted model are poor until it is "
                                    "trained (intermediate loops disagree with the last one for most tokens)")
        self._gen = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> TokenStep:
        return next(self._gen)

    def close(self) -> None:
        """Stop generating (e.g. the client went away)."""
        if self.trace.finish_reason is None:
            self.trace.finish_reason = "cancelled"
        self._gen.close()

    def _run(self):
        dec, trace = self.decoder, self.trace
        start = time.perf_counter()
        trace.prefill = {"tokens": len(self.prompt_ids) - 1, "flops": dec.prefill(self.prompt_ids[:-1])}
        trace.prefill["wall_ms"] = 1000 * (time.perf_counter() - start)
        generator = torch.Generator().manual_seed(self.sampling.seed)
        processors = self.sampling.processors()
        ids = list(self.prompt_ids)
        generated: list[int] = []
        text_so_far = ""
        for index in range(self.max_new_tokens):
            t0 = time.perf_counter()
            result = dec.step(ids[-1])
            t_sample = time.perf_counter()
            token = choose_token(result.logits, ids, processors, self.sampling.temperature, generator)
            wall_ms = 1000 * (time.perf_counter() - t0)
            if token in self.eos_ids:
                trace.finish_reason = "eos"
                return
            generated.append(token)
            ids.append(token)
            full_text = self.tokenizer.decode(generated, skip_special_tokens=True)
            piece, text_so_far = full_text[len(text_so_far):], full_text
            time_ms = {**result.time_ms, "sampling": 1000 * (time.perf_counter() - t_sample)}
            kv, kv_full = dec.kv_entries()
            step = TokenStep(
                index=index, position=dec.length - 1, token_id=token, text=piece, depth=result.depth,
                max_depth=dec.max_loops, exit_reason=result.reason, signal_name=dec.policy.signal_name,
                threshold=dec.policy.threshold, loops=result.loops, flops=result.flops,
                flops_full=dec.costs.full_token(dec.length), kv_entries=kv, kv_entries_full=kv_full,
                caught_up=result.caught_up, wall_ms=wall_ms, inspected_flops=result.inspected_flops, time_ms=time_ms,
            )
            trace.steps.append(step)
            yield step
            if any(s in text_so_far for s in self.stop):
                trace.finish_reason = "stop"
                return
        trace.finish_reason = "length"


def stream(model, tokenizer, prompt: str, policy: DepthPolicy | None = None, **settings) -> Stream:
    """Start an adaptive generation; iterate the result for ``TokenStep``s (see ``Stream``)."""
    return Stream(model, tokenizer, prompt, policy, **settings)


def generate(model, tokenizer, prompt: str, policy: DepthPolicy | None = None, **settings) -> GenerationTrace:
    """Run an adaptive generation to the end and return its ``GenerationTrace``."""
    s = stream(model, tokenizer, prompt, policy, **settings)
    for _ in s:
        pass
    return s.trace


def choose_token(logits: torch.Tensor, ids: list[int], processors, temperature: float, generator) -> int:
    """The next token: processors (repetition penalty, temperature, top-p), then argmax or a seeded draw."""
    scores = processors(torch.tensor([ids]), logits.float()[None])
    if temperature == 0:
        return int(scores.argmax(-1))
    probs = torch.softmax(scores, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a generation (the tokenizer's and the config's)."""
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None), model.config.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(value)
    return ids


def describe_model(model: RecursiveForCausalLM, name: str | None = None) -> dict:
    """What the trace says about the model (the dashboard's Model tab reads this)."""
    cfg = model.config
    costs = CostModel.from_model(model)
    return {
        "name": name or cfg.base_model or "recursive model",
        "base_model": cfg.base_model,
        "sharing": cfg.sharing if cfg.num_loops > 1 else "none",
        "num_loops": cfg.num_loops,
        "block_size": cfg.block_size,
        "num_prelude": cfg.num_prelude,
        "num_coda": cfg.num_coda,
        "num_positions": cfg.num_hidden_layers,
        "layer_map": list(cfg.layer_map),
        "source_layers": cfg.source_layers,
        "init_method": cfg.init_method,
        "lora_rank": "full" if cfg.lora_full_rank else cfg.lora_rank,
        "parameters": model.parameter_counts(),
        "head_flops": costs.head(),
        "kv_bytes_per_entry": costs.kv_numbers_per_entry() * model.dtype.itemsize,
        "router_type": cfg.router_type,
        "halting_heads": model.has_halting_heads,
        "training": cfg.training,
    }
