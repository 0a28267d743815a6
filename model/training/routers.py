"""The ``routers`` stage of ``python -m model.training``: Mixture-of-Recursions routers on a trained
recursive model, trained together with the block by distillation from the teacher.

    python -m model.training routers --from runs/rrt-ee --routing expert --capacity 1,0.67,0.33 --tokens 1M --out runs/mor-e
    python -m model.training routers --from runs/rrt-ee --routing token --tokens 1M --out runs/mor-t

The MoR paper trains routers from scratch at billions of tokens; here they are added to a distilled
relaxed model. Loss = KD(teacher || routed student) + router losses: expert-choice BCE auxiliary
(``sigmoid >= 0.5`` learns top-k membership: the causal decode rule), token-choice balancing loss +
z-loss (or loss-free bias), with all-max-depth balance warm-up.
"""
from __future__ import annotations

import argparse

import torch

from model.conversion.recursify import add_routers
from model.definition.routers import expert_choice_forward, token_choice_forward, update_balance_bias


def parse_capacity(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"capacity must be comma-separated numbers, got {text!r}") from exc
    if not values or any(not 0 < v <= 1 for v in values) or values != sorted(values, reverse=True):
        raise argparse.ArgumentTypeError("capacity values must be in (0, 1] and non-increasing, e.g. 1,0.67,0.33")
    return values


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="from_", required=True, help="trained recursive run or model folder")
    parser.add_argument("--base", default="smollm2-135m", help="teacher")
    group = parser.add_argument_group("routing")
    group.add_argument("--routing", default="expert", choices=["expert", "token"])
    group.add_argument("--capacity", type=parse_capacity, default=None,
                       help="expert-choice share of tokens per recursion (default 1, (N-1)/N, ..., 1/N)")
    group.add_argument("--router-alpha", type=float, default=0.1, help="gate scale (straight-through)")
    group.add_argument("--aux-coeff", type=float, default=1e-3, help="expert-choice BCE auxiliary weight")
    group.add_argument("--balance", default="loss", choices=["loss", "loss_free"], help="token-choice balancing")
    group.add_argument("--balance-coeff", type=float, default=0.1)
    group.add_argument("--z-coeff", type=float, default=1e-5)
    group.add_argument("--bal-warmup", type=int, default=0, help="token-choice: steps routing every token to max depth")


def build_router_model(model, args):
    """``model`` (a trained recursive model) with fresh routers of the requested kind."""
    if model.config.router_type == args.routing:
        return model
    torch.manual_seed(args.seed)
    return add_routers(model, args.routing, args.capacity, args.router_alpha)


def routers_loss(model, teacher_logits, ids, args, kd_loss, step: int = 0) -> tuple[torch.Tensor, dict]:
    """KD on the routed student's output + the router losses; statistics for the log."""
    unwrapped = getattr(model, "module", model)
    if args.routing == "expert":
        out = expert_choice_forward(unwrapped, ids, unwrapped.config.router_capacity, args.aux_coeff)
    else:
        out = token_choice_forward(unwrapped, ids, args.balance_coeff if args.balance == "loss" else 0.0,
                                   args.z_coeff, warmup=step < args.bal_warmup)
    kd = kd_loss(out.logits, teacher_logits, args.kd, args.loss)
    stats = {"kd": float(kd.detach()), "router_aux": float(out.aux_loss.detach()),
             "avg_depth": float(out.depths.float().mean())}
    stats.update({k: v for k, v in out.stats.items() if isinstance(v, float)})
    stats.update({f"tokens_depth{d + 1}": n for d, n in enumerate(out.stats["tokens_per_depth"])})
    if args.routing == "token" and args.balance == "loss_free":
        with torch.no_grad():
            update_balance_bias(unwrapped.token_router, out.depths)
    return kd + out.aux_loss, stats
