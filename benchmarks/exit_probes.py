"""Cheap confidence probes: how often they take the same exit decision as the full LM head, and what they cost.

    .venv/bin/python benchmarks/exit_probes.py                                  # the default, 24 held-out chats
    .venv/bin/python benchmarks/exit_probes.py --conversations 48 --ranks 32 64 128 --json .cache/runs/probes.json

A confidence exit (``max_prob >= threshold`` after loop r) needs the softmax of the exit logits:
coda -> final norm -> tied head over 49,152 tokens, the cost of ≈ 6-9 layers. The probes measured here:

- ``full``: the reference (coda, norm, full head).
- ``lowrank-r``: coda, norm, then the rank-r SVD of the tied head: ``(n(h) V_r) S_r U_r^T``; the
  logits over all tokens at r/d of the head's cost.
- ``cand-r``: the same low-rank logits pick 16 candidates, the exact head scores them, and the
  softmax normaliser is exact on the candidates plus low-rank for the rest.

Text: prompt + the teacher's greedy answer of held-out chats (``heldout-chat-answers``, never trained
on), teacher-forced; every token and every loop before the last is one decision. Decision agreement
with ``full`` at thresholds 0.5–0.9, and the time of each probe against one decoder layer, batch 1,
1 thread, median of repeated calls in the same run. Not a test: nothing passes or fails.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model import load_model  # noqa: E402
from model.data.answer_store import conversation_ids, load_answers  # noqa: E402

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
CANDIDATES = 16


class LowRankHead:
    """The tied head's rank-r SVD: low-rank logits, and exact ones on candidates."""

    def __init__(self, weight: torch.Tensor, rank: int):
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        self.weight = weight
        self.proj = (vh[:rank].T * s[:rank]).contiguous()  # (d, r): n(h) -> coefficients
        self.basis = u[:, :rank].contiguous()  # (V, r)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        return (normed @ self.proj) @ self.basis.T

    def max_prob(self, normed: torch.Tensor, candidates: int = 0) -> torch.Tensor:
        approx = self.logits(normed)
        if not candidates:
            return torch.softmax(approx, -1).max(-1).values
        top = approx.topk(candidates, -1).indices  # (n, k)
        exact = torch.einsum("nd,nkd->nk", normed, self.weight[top])
        rest = approx.scatter(-1, top, float("-inf"))
        log_z = torch.logsumexp(torch.cat([exact, rest], -1), -1)
        return (exact.max(-1).values - log_z).exp()


@torch.no_grad()
def normed_exits(model, ids: list[int]) -> list[torch.Tensor]:
    """Per loop r < num_loops: the final-normed exit states (T, d) of a teacher-forced pass."""
    x = torch.tensor([ids])
    out = model(x, output_loop_logits=False)
    states = out.loop_hidden_states
    rope = model.model.rope(states[0], torch.arange(x.shape[1])[None])
    exits = []
    for h in states[:-1]:
        coda = model.model.run_positions(h, model.config.coda_positions, rope)
        exits.append(model.model.norm(coda)[0])
    return exits


def median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


@torch.no_grad()
def timings(model, heads: dict[str, LowRankHead], reps: int) -> dict[str, float]:
    """ms per single-token call: one decoder layer (with a 256-token cache), the coda, each probe."""
    from transformers.cache_utils import DynamicCache

    cfg, inner = model.config, model.model
    cache = DynamicCache()
    ctx = torch.randint(0, cfg.vocab_size, (1, 256))
    inner(input_ids=ctx, past_key_values=cache, use_cache=True)
    h = torch.randn(1, 1, cfg.hidden_size) * 0.1
    rope = inner.rope(h, torch.tensor([[256]]))
    p = cfg.loop_positions(1)[0]

    def one_layer():
        inner.run_positions(h, [p], rope, None, cache)
        cache.layers[p].crop(-1)

    normed = inner.norm(h)[0]
    weight = model.lm_head.weight
    out = {"layer_ms": median_ms(one_layer, reps),
           "full_head_ms": median_ms(lambda: torch.softmax(normed @ weight.T, -1).max(-1), reps)}
    for name, head in heads.items():
        out[f"{name}_ms"] = median_ms(lambda head=head: head.max_prob(normed), reps)
        out[f"{name}-cand_ms"] = median_ms(lambda head=head: head.max_prob(normed, CANDIDATES), reps)
    if cfg.coda_positions:
        def coda():
            inner.run_positions(h, cfg.coda_positions, rope, None, cache)
            for q in cfg.coda_positions:
                cache.layers[q].crop(-1)
        out["coda_ms"] = median_ms(coda, reps)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--conversations", type=int, default=24)
    p.add_argument("--ranks", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    model.eval()
    heads = {f"lowrank-{r}": LowRankHead(model.lm_head.weight.detach(), r) for r in args.ranks}
    answers = load_answers("heldout-chat-answers")[: args.conversations]
    agree = {name: {t: 0 for t in THRESHOLDS} for name in [*heads, *(f"{n}-cand" for n in heads)]}
    exits_full = {t: 0 for t in THRESHOLDS}
    decisions = 0
    for answer in answers:
        for normed in normed_exits(model, conversation_ids(answer)[:512]):
            full = torch.softmax(model.lm_head(normed).float(), -1).max(-1).values
            decisions += full.numel()
            estimates = {}
            for name, head in heads.items():
                estimates[name] = head.max_prob(normed)
                estimates[f"{name}-cand"] = head.max_prob(normed, CANDIDATES)
            for t in THRESHOLDS:
                exits_full[t] += int((full >= t).sum())
                for name, est in estimates.items():
                    agree[name][t] += int(((est >= t) == (full >= t)).sum())
    result = {"model": args.model, "decisions": decisions, "conversations": len(answers),
              "full_exit_rate": {t: exits_full[t] / decisions for t in THRESHOLDS},
              "agreement": {name: {t: v / decisions for t, v in row.items()} for name, row in agree.items()},
              "timing": timings(model, heads, args.reps)}
    print(json.dumps(result, indent=1))
    timing = result["timing"]
    print(f"\n| probe | ms | × one layer | " + " | ".join(f"agree @ {t}" for t in THRESHOLDS) + " |")
    print("|---|---|---|" + "---|" * len(THRESHOLDS))
    print(f"| full head | {timing['full_head_ms']:.2f} | ×{timing['full_head_ms'] / timing['layer_ms']:.2f} | "
          + " | ".join("1.000" for _ in THRESHOLDS) + " |")
    for name in agree:
        ms = timing[f"{name}_ms"]
        print(f"| {name} | {ms:.2f} | ×{ms / timing['layer_ms']:.2f} | "
              + " | ".join(f"{agree[name][t] / decisions:.3f}" for t in THRESHOLDS) + " |")
    print(f"\none layer: {timing['layer_ms']:.2f} ms" + (f"; the coda: {timing['coda_ms']:.2f} ms" if "coda_ms" in timing
                                                        else "") + f"; full-head exit rate: " +
          ", ".join(f"{t}: {v:.3f}" for t, v in result["full_exit_rate"].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
