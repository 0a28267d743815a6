"""Does the engine run the same on a GPU? (For Spaces' ZeroGPU path, which the CPU tests never touch.)

    python benchmarks/cuda_check.py [--tokenizer FOLDER]

A tiny random recursive model with SmolLM2's vocabulary decodes the same prompts on the CPU and on
CUDA, in fp32, for every policy family and KV mode; then the batching engine (CDB) serves them
together. Reported per case: whether the tokens and per-token depths agree, and the largest
difference of the per-loop exit signals. Exits 1 on a mismatch of tokens or depths. Not a test:
CI has no GPU; the result of the last run on a lent GPU is in docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.serving import BatchEngine, Request  # noqa: E402
from model.inference.prompts import encode_prompt  # noqa: E402
from model.inference.generation import generate  # noqa: E402
from model.inference.policies import Confidence, FixedDepth, Halting, Router, Saturation  # noqa: E402
from model.conversion.recursify import recursify  # noqa: E402
from model.conversion.recursify import add_routers  # noqa: E402
from model.training.student import add_halting_heads  # noqa: E402
from tests.conftest import tiny_llama  # noqa: E402

PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "1, 2, 3, 4,"]


def build(tokenizer):
    """(tiny recursive model with halting heads, the same with expert-choice routers)."""
    torch.manual_seed(0)
    rec = recursify(tiny_llama(vocab=len(tokenizer)), num_loops=3, lora_rank=4)
    return add_halting_heads(rec, 8).eval(), add_routers(rec, "expert").eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the embedded SmolLM2's)")
    p.add_argument("--device", default="cuda", help="compared against the CPU (cpu: a self-check of this script)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from model import load_tokenizer

        tokenizer = load_tokenizer("smollm2-135m")
    model, routed = build(tokenizer)
    cases = [(model, "fixed 2", lambda: FixedDepth(2), "sync"), (model, "confidence 6.7e-5", lambda: Confidence(6.7e-5), "sync"),
             (model, "confidence 6.7e-5 copy", lambda: Confidence(6.7e-5), "copy"),
             (model, "saturation 0.9", lambda: Saturation(0.9), "sync"), (model, "halting 0.5", lambda: Halting(0.5), "sync"),
             (routed, "router recursion", lambda: Router(0.0), "recursion"), (routed, "router share", lambda: Router(0.0), "share")]
    failures = 0
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"device: {name}; torch {torch.__version__}")
    print("| case | prompt | tokens per depth (CPU) | tokens equal | depths equal | max |Δ max-prob| |")
    print("|---|---|---|---|---|---|")
    for net, name, policy, kv in cases:
        for prompt in PROMPTS:
            runs = []
            for device in ("cpu", args.device):
                trace = generate(net.to(device), tokenizer, prompt, policy=policy(), kv_mode=kv, max_new_tokens=12)
                runs.append(trace)
            net.to("cpu")
            a, b = runs
            tokens = [s.token_id for s in a.steps] == [s.token_id for s in b.steps]
            depths = [s.depth for s in a.steps] == [s.depth for s in b.steps]
            delta = max((abs((x.max_prob or 0) - (y.max_prob or 0)) for sa, sb in zip(a.steps, b.steps)
                         for x, y in zip(sa.loops, sb.loops)), default=0.0)
            failures += not (tokens and depths)
            hist = [sum(1 for s in a.steps if s.depth == d) for d in range(1, net.config.num_loops + 1)]
            print(f"| {name} | {prompt[:20]} | {hist} | {tokens} | {depths} | {delta:.1e} |")
    # the batching engine on CUDA serves the same tokens as solo CPU generation
    engine = BatchEngine(model, tokenizer, strategy="cdb", max_requests=4, device=args.device)
    for i, prompt in enumerate(PROMPTS):
        engine.submit(Request(prompt_ids=encode_prompt(tokenizer, prompt), max_new_tokens=12, policy=Confidence(6.7e-5),
                              kv_mode="sync", request_id=f"r{i}", prompt=prompt))
    results = engine.run()
    model.to("cpu")
    for i, prompt in enumerate(PROMPTS):
        solo = generate(model, tokenizer, prompt, policy=Confidence(6.7e-5), kv_mode="sync", max_new_tokens=12)
        same = results[f"r{i}"].token_ids == [s.token_id for s in solo.steps]
        failures += not same
        print(f"| CDB engine on {args.device} vs solo CPU | {prompt[:20]} | – | {same} | – | – |")
    print("all equal" if not failures else f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
