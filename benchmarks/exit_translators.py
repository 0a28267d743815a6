"""Would per-boundary exit translators (a tuned-lens-style affine map) improve the early exits?

    .venv/bin/python benchmarks/exit_translators.py --model default --train-rows 64 --epochs 2 \
        --json .cache/eval/translators.json

A measurement, not a feature: the trained model stays frozen. For every loop boundary r < R, the
exit path's hidden state (loop r's residual stream after the coda layers, just before the shared
final norm and LM head) gets ``h + W_r h + b_r`` with ``W_r, b_r`` initialised at zero (the identity
map) and trained by KL(final loop || exit r) on cached states of ``--train-rows`` train rows (the
self-distillation target of the RRT exit recipe). Reported on the first ``--eval-tokens`` tokens of
every held-out set of DATA.md, with and without the translator: exit perplexity, KL to the final
loop, top-1 agreement with the final loop. Cost of the map: 2·d² FLOPs per probe against the LM
head's 2·d·V (d = 576, V = 49,152: 1.2 %).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.io.checkpoint import load_model  # noqa: E402
from model.data import heldout_names, load_split  # noqa: E402


@torch.no_grad()
def exit_states(model, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per boundary r < R: the exit path's pre-norm hidden state; and the final loop's normed state
    (cached instead of its logits: 2 KB per token instead of 200 KB)."""
    final, loop_states, _ = model.model(input_ids=ids)
    pos = torch.arange(ids.shape[1])[None]
    rope = model.model.rope(loop_states[0], pos)
    states = [model.model.run_positions(h, model.config.coda_positions, rope, None, None) for h in loop_states[:-1]]
    return states, final


def exit_logits(model, state: torch.Tensor, translator: torch.nn.Linear | None) -> torch.Tensor:
    if translator is not None:
        state = state + translator(state)
    return model.lm_head(model.model.norm(state))


def metrics(logits: torch.Tensor, final: torch.Tensor, ids: torch.Tensor) -> dict:
    s = F.log_softmax(logits[:, :-1].float(), -1)
    f = F.log_softmax(final[:, :-1].float(), -1)
    n = ids[:, 1:].numel()
    return {"nll": float(F.nll_loss(s.reshape(-1, s.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")),
            "kl": float((f.exp() * (f - s)).sum()), "agree": float((s.argmax(-1) == f.argmax(-1)).sum()), "n": n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--train-rows", type=int, default=64, help="512-token train rows whose states are cached")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-tokens", type=int, default=1024, help="tokens per held-out set")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.time()
    model = load_model(args.model)[0].eval().requires_grad_(False)
    d, boundaries = model.config.hidden_size, model.config.num_loops - 1
    translators = [torch.nn.Linear(d, d) for _ in range(boundaries)]
    for t in translators:
        torch.nn.init.zeros_(t.weight)
        torch.nn.init.zeros_(t.bias)
    rows = load_split("train")[: args.train_rows]
    cached = [exit_states(model, row[None]) for row in rows]  # the frozen model runs once per row
    optimizer = torch.optim.Adam([p for t in translators for p in t.parameters()], lr=args.lr)
    log = []
    for epoch in range(args.epochs):
        for i in torch.randperm(len(cached)).tolist():
            states, final = cached[i]
            with torch.no_grad():
                target = F.log_softmax(model.lm_head(final).float(), -1)
            loss = sum(F.kl_div(F.log_softmax(exit_logits(model, s, t).float(), -1), target, log_target=True,
                                reduction="batchmean") / s.shape[1] for s, t in zip(states, translators))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            log.append(float(loss.detach()))
        print(f"epoch {epoch + 1}: mean KL to final {sum(log[-len(cached):]) / len(cached):.3f}", flush=True)
    results = {"command": "python benchmarks/exit_translators.py " + " ".join(argv or sys.argv[1:]),
               "model": args.model, "train_tokens": args.train_rows * rows.shape[1], "sets": {}}
    for name in heldout_names():
        ids = load_split(name)[: max(1, args.eval_tokens // 512)]
        per = {"without": [], "with": []}
        with torch.no_grad():
            for row in ids:
                states, final = exit_states(model, row[None])
                final = model.lm_head(final)
                for r, (s, t) in enumerate(zip(states, translators)):
                    for key, tr in (("without", None), ("with", t)):
                        m = metrics(exit_logits(model, s, tr), final, row[None])
                        if len(per[key]) <= r:
                            per[key].append({k: 0.0 for k in m})
                        for k, v in m.items():
                            per[key][r][k] += v
        results["sets"][name] = {key: [{"ppl": math.exp(m["nll"] / m["n"]), "kl": m["kl"] / m["n"],
                                        "agreement": m["agree"] / m["n"]} for m in loops] for key, loops in per.items()}
    results["wall_seconds"] = round(time.time() - started)
    print("| exit | translator | PPL (geo-mean over sets) | KL to final loop | agreement with final loop |")
    print("|---|---|---|---|---|")
    sets = list(results["sets"])
    for r in range(boundaries):
        for key in ("without", "with"):
            ppl = math.exp(sum(math.log(results["sets"][s][key][r]["ppl"]) for s in sets) / len(sets))
            kl = sum(results["sets"][s][key][r]["kl"] for s in sets) / len(sets)
            ag = sum(results["sets"][s][key][r]["agreement"] for s in sets) / len(sets)
            print(f"| loop {r + 1} | {key} | {ppl:.1f} | {kl:.3f} | {ag:.3f} |")
    print(f"({results['train_tokens']:,} train tokens, {args.epochs} epochs, {results['wall_seconds']} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
