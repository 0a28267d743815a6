"""Command line: adaptive generation with per-token depths.

    python -m model.inference --prompt "The capital of France is" --loops 3 --policy confidence --threshold 0.8
    python -m model.inference --model runs/rrt --policy saturation --threshold 0.95 --json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from model.io.checkpoint import EMBEDDED_NAME, ModelLoadError, load_model
from model.inference.decoder import KV_MODES
from model.errors import EngineInputError
from model.inference.generation import generate
from model.definition.modeling import RecursiveForCausalLM
from model.inference.policies import CONFIDENCE_MEASURES, POLICIES, make_policy
from model.conversion.recursify import recursify

DEPTH_COLOURS = ["\033[38;5;33m", "\033[38;5;208m", "\033[38;5;141m", "\033[38;5;40m", "\033[38;5;196m"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.inference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to run
    p.add_argument("--model", default=EMBEDDED_NAME, help="name, checkpoint folder or Hub id")
    p.add_argument("--loops", type=int, default=3, help="loops when converting a plain model")
    p.add_argument("--sharing", default="cycle", choices=["cycle", "sequence", "middle_cycle"])
    p.add_argument("--init", default="average", choices=["stepwise", "average", "lower"])
    p.add_argument("--lora-rank", default="64", help="LoRA rank when converting: an int or 'full'")
    # how deep each token goes
    p.add_argument("--policy", default="confidence", choices=sorted(POLICIES))
    p.add_argument("--threshold", type=float, default=None, help="exit threshold (confidence/saturation)")
    p.add_argument("--measure", default="max_prob", choices=CONFIDENCE_MEASURES)
    p.add_argument("--depth", type=int, default=None, help="loops for --policy fixed")
    p.add_argument("--kv-mode", default="sync", choices=KV_MODES)
    # decoding
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the whole trace as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        model, tokenizer = load_model(args.model)
        if not isinstance(model, RecursiveForCausalLM):
            rank = "full" if args.lora_rank == "full" else int(args.lora_rank)
            model = recursify(model, num_loops=args.loops, sharing=args.sharing, init=args.init,
                              lora_rank=rank, base_name=args.model)
        policy = make_policy(args.policy, args.threshold, args.depth, args.measure)
        trace = generate(model, tokenizer, args.prompt, policy=policy, max_new_tokens=args.max_new_tokens,
                         kv_mode=args.kv_mode, temperature=args.temperature, top_p=args.top_p,
                         repetition_penalty=args.repetition_penalty, seed=args.seed, chat=args.chat,
                         model_name=args.model)
    except (ModelLoadError, EngineInputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(trace.to_dict(), sys.stdout)
        print()
        return 0
    colour = sys.stdout.isatty()
    for step in trace.steps:
        text = step.text.replace("\n", "\\n")
        if colour:
            print(f"{DEPTH_COLOURS[(step.depth - 1) % len(DEPTH_COLOURS)]}{text}\033[0m", end="")
        else:
            print(f"{text}[{step.depth}]", end="")
    t = trace.totals()
    print(f"\n\n{t['tokens']} tokens, average depth {t['avg_depth']:.2f}/{t['max_depth']} "
          f"(tokens per depth {t['depth_counts']}), block FLOPs saved {t['block_flops_saved_pct']:.1f}%, "
          f"total FLOPs saved {t['flops_saved_pct']:.1f}%, {t['tokens_per_s']:.1f} tokens/s")
    for note in trace.notes:
        print(f"note: {note}")
    return 0

