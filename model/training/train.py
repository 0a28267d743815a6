"""Uptraining by distillation and early-exit post-training, on ``accelerate``, resumable.

Two commands (METHODS.md §3.4, §3.5, §3.8)::

    python -m model.training uptrain --base smollm2-135m --loops 2 --sharing middle_cycle --init average \\
        --lora-rank 128 --lora-init asvd --tokens 1M --out .cache/runs/rrt
    python -m model.training exits --from .cache/runs/rrt --tokens 300k --out .cache/runs/rrt-ee

``uptrain`` converts the base (``recursify``), optionally re-initialises the LoRA factors
activation-aware (``model.conversion.asvd``), and distils the teacher's next-token distribution into the
recursive model (forward or reverse KL at a temperature, optional CE term). ``uptrain --from <model>``
fine-tunes a trained model instead (e.g. ``default``; the conversion flags are then unused). ``exits`` continues
from an uptrained run with the RRT early-exit recipe (final loop weight 1; intermediate loops
"aggressive" ``c`` x (CE + KL toward the detached final loop)) and trains one halting head per loop
boundary (BCE toward ``1[argmax at loop r == argmax at the final loop]``).

Data: rows of the prose ``train`` split, or with ``--answers-share S`` a mix: global row ``n`` of the run
comes from the teacher's own chat answers (``model.data.answer_store.packed_rows("train", ...)``, prompt +
answer, forward KL on every position like the prose) when ``answer_row(n, S)``, so exactly
``floor(n * S)`` of the first ``n`` rows do, spread evenly; each stream keeps its own epoch and position.
With ``--on-policy-share P`` a share ``P`` of those answer rows hold the student's own sampled answers to the
same prompts instead (``model.training.on_policy``: GKD / MiniLLM-style on-policy distillation).

A run folder holds ``checkpoint/`` (a loadable model folder plus ``trainer_state.pt``: optimizer,
scheduler, RNG, step, tokens seen and data position; replaced atomically), ``log.txt`` and
``metrics.jsonl``. Rerunning the same command resumes from ``checkpoint/``; a killed run loses at
most one ``--save-every`` interval. ``--tokens`` may be changed on resume (the cosine schedule is
re-shaped to the new total; the step, data position and optimizer state carry over). ``accelerate launch -m model.training ...`` runs the same code on
several devices (each process takes its slice of every global batch).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.io.folders import RUN_CHECKPOINT as CHECKPOINT
from model.evaluation.metrics import LoopTally
from model.io.folders import run_model_folder
from model.training.objectives import exits_loss, kd_loss, uptrain_loss
from model.training.rows import training_batches
from model.training.run_state import (
    CosineWithWarmup, Progress, fit_budget, load_trainer_state, parse_tokens, provenance, save_run_checkpoint,
)
from model.training.student import add_halting_heads, build_uptrain_model, set_trainable

log = logging.getLogger(__name__)

# --- validation ---------------------------------------------------------------------------------
@torch.no_grad()
def validate(model, teacher, batches: list[torch.Tensor], device) -> dict:
    """Per-loop perplexity, KL to the teacher and top-1 agreement on fixed validation rows."""
    was_training = model.training
    model.eval()
    tally = LoopTally()
    for ids in batches:
        ids = ids.to(device)
        loops = model(input_ids=ids, output_loop_logits=True).loop_logits
        tally.add([logits[:, :-1] for logits in loops], ids[:, 1:], teacher(input_ids=ids).logits[:, :-1])
    model.train(was_training)
    return tally.result()


# --- the loop -------------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> Path:
    """Run (or resume) one ``uptrain`` / ``exits`` run; returns the checkpoint folder."""
    from accelerate import Accelerator

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum)
    handler = _setup_logging(out, accelerator.is_main_process)
    try:
        return _train(args, out, accelerator)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _train(args: argparse.Namespace, out: Path, accelerator) -> Path:
    from model.io.checkpoint import load_model
    from model.data import iter_batches, load_split

    if not 0 <= args.answers_share <= 1:
        raise ValueError(f"--answers-share must be in [0, 1], got {args.answers_share}")
    on_policy_settings = None
    if getattr(args, "on_policy_share", 0) > 0:
        from model.training.on_policy import OnPolicySettings

        on_policy_settings = OnPolicySettings.from_args(args)
        on_policy_settings.validate(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m model.training " + " ".join(shlex.quote(a) for a in args.argv)

    saved = load_trainer_state(out)
    teacher, tokenizer = load_model(args.base)
    teacher.requires_grad_(False)
    if saved is not None:
        model = load_model(out / CHECKPOINT)[0]
        log.info("resuming %s at step %d (%d tokens seen)", out, saved["progress"]["step"],
                 saved["progress"]["tokens_seen"])
    elif args.stage == "uptrain" and args.from_:  # fine-tune a trained model (e.g. the default)
        model = load_model(run_model_folder(args.from_))[0]
        if args.with_exits:
            model = add_halting_heads(model, args.halting_hidden)
    elif args.stage == "uptrain":
        model = build_uptrain_model(args, teacher)
        if args.with_exits:  # the "co-trained" ablation: exit losses and halting heads from the start
            model = add_halting_heads(model, args.halting_hidden)
    elif args.stage == "routers":
        from model.training.routers import build_router_model

        model = build_router_model(load_model(run_model_folder(args.from_))[0], args)
    else:
        model = add_halting_heads(load_model(run_model_folder(args.from_))[0], args.halting_hidden)
    model.train()
    # stages that came with the starting model; this run's own record (if any) follows them
    inherited_stages = len((model.config.training or {}).get("stages", [])) - (saved is not None)
    trainable = set_trainable(model, args.train)
    log.info("%s: %s; training %d tensors (%s)", args.stage, model.parameter_counts(), len(trainable), args.train)

    world = accelerator.num_processes
    rows_per_step = args.batch_size * args.grad_accum * world
    total_steps = max(1, math.ceil(args.tokens / (rows_per_step * args.seq_len)))
    params = [p for p in model.parameters() if p.requires_grad]
    heads = [p for n, p in model.named_parameters()
             if p.requires_grad and n.startswith(("halting_heads", "routers.", "token_router."))]
    head_ids = {id(p) for p in heads}
    groups = [{"params": [p for p in params if id(p) not in head_ids], "lr": args.lr}]
    if heads:  # fresh heads on a tiny budget: a larger step size than the pretrained weights
        groups.append({"params": heads, "lr": getattr(args, "halting_lr", args.lr)})
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    warmup = max(1, min(args.warmup, total_steps // 10 or 1))
    schedule = CosineWithWarmup(total_steps, warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    progress = Progress()
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        schedule.total_steps, schedule.warmup_steps = total_steps, warmup  # --tokens may be re-budgeted
        progress = Progress(**saved["progress"])
        torch.set_rng_state(saved["rng"]["torch"])
        np.random.set_state(saved["rng"]["numpy"])
        random.setstate(saved["rng"]["python"])
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    teacher.to(device).eval()
    val_batches = list(load_split("val", args.seq_len)[: args.val_rows].split(args.batch_size))
    if args.stage == "routers":
        from model.training.routers import routers_loss

        def loss_fn(model, teacher_logits, ids, args, mask=None):
            assert mask is None, "the routers stage trains on full rows only"
            return routers_loss(model, teacher_logits, ids, args, kd_loss, progress.step)
    else:
        loss_fn = exits_loss if args.stage == "exits" or getattr(args, "with_exits", False) else uptrain_loss
    unwrapped = accelerator.unwrap_model(model)

    def checkpoint(final: bool = False) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            unwrapped.config.training = provenance(unwrapped.config.training, args, command, progress, final,
                                                    device_name, inherited_stages)
            save_run_checkpoint(out, unwrapped, tokenizer, optimizer, scheduler, progress)
            log.info("checkpoint at step %d (%d tokens) -> %s", progress.step, progress.tokens_seen, out / CHECKPOINT)

    def evaluate_now() -> None:
        record = {"step": progress.step, "tokens_seen": progress.tokens_seen,
                  **validate(unwrapped, teacher, val_batches, device)}
        progress.history.append(record)
        log.info("val step %d: ppl %s kl %s agreement %s", progress.step,
                 [round(x, 2) for x in record["ppl"]], [round(x, 3) for x in record["kl"]],
                 [round(x, 3) for x in record["agreement"]])
        _append_jsonl(out / "metrics.jsonl", {"kind": "val", **record})

    if progress.step >= total_steps:
        log.info("run already complete (%d steps); nothing to do", progress.step)
        return out / CHECKPOINT
    if progress.step == 0 and not progress.history:
        evaluate_now()  # the starting point, for the record
    bar = tqdm(total=total_steps, initial=progress.step, desc=args.stage, unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    started, wall_at_start = time.time(), progress.wall_seconds
    first_step, timing = progress.step, {}
    on_policy = None
    if on_policy_settings is not None:  # the student samples a share of the answer rows (on_policy.py)
        from model.training.on_policy import OnPolicyRows, student_sampler

        sample = student_sampler(unwrapped, accelerator.autocast, tokenizer.eos_token_id, on_policy_settings)
        on_policy = OnPolicyRows(args, progress, sample, tokenizer.eos_token_id)
    batches = training_batches(iter_batches, args, progress, world, accelerator.process_index, on_policy)
    micro, stats = 0, {}
    while progress.step < total_steps:
        ids, mask = next(batches)
        ids, mask = ids.to(device), None if mask is None else mask.to(device)
        with accelerator.accumulate(model):
            with torch.no_grad(), accelerator.autocast():
                teacher_logits = teacher(input_ids=ids).logits
            with accelerator.autocast():
                loss, stats = loss_fn(model, teacher_logits, ids, args, mask)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        micro += 1
        progress.tokens_seen += args.batch_size * world * args.seq_len
        if micro % args.grad_accum:
            continue
        progress.step += 1
        scheduler.step()
        if args.max_seconds:
            total_steps = fit_budget(args, progress, schedule, first_step, started, total_steps, rows_per_step, bar,
                                      timing)
        progress.wall_seconds = wall_at_start + time.time() - started
        rate = progress.tokens_seen / max(progress.wall_seconds, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", tok_s=f"{rate:.0f}")
        if on_policy is not None:
            stats.update(on_policy_s=round(progress.on_policy_seconds, 2),
                         sampled_tokens=progress.on_policy_tokens_sampled)
        _append_jsonl(out / "metrics.jsonl", {"kind": "train", "step": progress.step, "loss": float(loss.detach()),
                                              "lr": scheduler.get_last_lr()[0], "tokens_seen": progress.tokens_seen,
                                              "wall_seconds": round(progress.wall_seconds, 1), **stats})
        if progress.step % args.log_every == 0:
            log.info("step %d/%d loss %.4f %s lr %.2e %.0f tok/s", progress.step, total_steps, float(loss.detach()),
                     {k: round(v, 4) for k, v in stats.items()}, scheduler.get_last_lr()[0], rate)
        done = progress.step >= total_steps
        if done or (args.eval_every and progress.step % args.eval_every == 0):
            evaluate_now()
        if done or progress.step % args.save_every == 0:
            checkpoint(final=done)
    bar.close()
    return out / CHECKPOINT


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _setup_logging(out: Path, main: bool) -> logging.Handler | None:
    """Log to ``<out>/log.txt`` (appending across resumes) on the main process."""
    if not main:
        return None
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handler = logging.FileHandler(out / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    return handler


# --- CLI ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model.training", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    up = sub.add_parser("uptrain", help="convert the base and distil it into the recursive model")
    conv = up.add_argument_group("conversion")
    conv.add_argument("--base", default="smollm2-135m", help="teacher / model to convert (name or folder)")
    conv.add_argument("--loops", type=int, default=2, help="number of loops B")
    conv.add_argument("--sharing", default="middle_cycle", choices=["cycle", "sequence", "middle_cycle"])
    conv.add_argument("--init", default="average", choices=["stepwise", "average", "lower"],
                      help="shared-block initialisation")
    conv.add_argument("--block-size", type=int, default=None, help="unique layers K in the loop (default: all)")
    conv.add_argument("--lora-rank", type=int, default=128, help="per-position LoRA rank (0 = none)")
    conv.add_argument("--lora-init", default="asvd", choices=["svd", "asvd"], help="plain or activation-aware SVD")
    conv.add_argument("--calib-sequences", type=int, default=64, help="ASVD calibration rows of the train split")
    conv.add_argument("--asvd-damping", type=float, default=1e-3, help="ASVD covariance damping (x mean diag)")
    up.add_argument("--from", dest="from_", default=None,
                    help="fine-tune this trained model (run folder, model folder or a name load_model knows, e.g. "
                         "default) instead of converting --base; the conversion flags are then unused")
    ex = sub.add_parser("exits", help="early-exit post-training + halting heads on an uptrained run")
    ex.add_argument("--from", dest="from_", required=True, help="uptrained run or model folder")
    ex.add_argument("--base", default="smollm2-135m", help="teacher")
    up.add_argument("--with-exits", action="store_true",
                    help="co-train the early exits and halting heads during uptraining (the exits-stage losses "
                         "from the first step) instead of post-training them")
    for p in (up, ex):
        recipe = p.add_argument_group("early-exit recipe")
        recipe.add_argument("--exit-weight", type=float, default=0.1, help="'aggressive' weight c of intermediate loops")
        recipe.add_argument("--self-kd-weight", type=float, default=1.0,
                            help="KL(final.detach() || loop r) relative to the intermediate CE")
        recipe.add_argument("--halting-hidden", type=int, default=64, help="halting head hidden width")
        recipe.add_argument("--halting-weight", type=float, default=1.0, help="BCE weight of the halting heads")
        recipe.add_argument("--halting-lr", type=float, default=3e-3, help="learning rate of the (fresh) halting heads")
    for p in (up, ex):
        policy = p.add_argument_group("on-policy distillation (model/training/on_policy.py)")
        policy.add_argument("--on-policy-share", type=float, default=0.0, metavar="P",
                            help="share of the teacher-answer rows (--answers-share) whose prompts the student answers "
                                 "itself (full depth, no grad, current weights); the teacher scores prompt + answer")
        policy.add_argument("--on-policy-tokens", type=int, default=128, metavar="N",
                            help="new tokens the student samples per prompt at most (stops at the end of its turn)")
        policy.add_argument("--on-policy-temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
        policy.add_argument("--on-policy-top-p", type=float, default=0.9, help="nucleus of the student's sampling")
    ro = sub.add_parser("routers", help="Mixture-of-Recursions routers on a trained run (model/training/routers.py)")
    from model.training.routers import add_router_arguments

    add_router_arguments(ro)
    ro.add_argument("--halting-lr", type=float, default=3e-3, help="learning rate of the fresh routers")
    for p in (up, ex, ro):
        opt = p.add_argument_group("optimisation")
        opt.add_argument("--tokens", type=parse_tokens, default=parse_tokens("1M"), help="training tokens (k/M ok)")
        opt.add_argument("--seq-len", type=int, default=512)
        opt.add_argument("--batch-size", type=int, default=2, help="rows per micro-batch per process")
        opt.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
        opt.add_argument("--lr", type=float, default=2e-4)
        opt.add_argument("--warmup", type=int, default=20, help="warm-up steps (at most 10%% of the run)")
        opt.add_argument("--weight-decay", type=float, default=0.0)
        opt.add_argument("--max-grad-norm", type=float, default=1.0)
        opt.add_argument("--train", default="lora", choices=["all", "lora", "routers"],
                         help="all parameters; LoRA + norms (+ halting heads, routers) with the shared block frozen; "
                              "or the routers alone")
        opt.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
        opt.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
        opt.add_argument("--seed", type=int, default=0, help="data order and init seed")
        opt.add_argument("--answers-share", type=float, default=0.0, metavar="S",
                         help="fraction of rows drawn from the teacher's own chat answers (assets/teacher-answers, "
                              "train split; model.teacher_answers), the rest from the prose train split")
        loss = p.add_argument_group("distillation loss")
        loss.add_argument("--kd", type=float, default=1.0, metavar="TEMPERATURE", help="KD temperature")
        loss.add_argument("--loss", default="forward_kl", choices=["forward_kl", "reverse_kl"])
        loss.add_argument("--ce-weight", type=float, default=0.0, help="weight of an extra next-token CE term")
        run = p.add_argument_group("run")
        run.add_argument("--max-seconds", type=float, default=0,
                         help="wall-clock budget of this invocation: after --budget-probe timed steps the cosine "
                              "schedule is shortened so the run ends (decayed, validated, checkpointed) in time")
        run.add_argument("--budget-probe", type=int, default=10, help="steps timed before fitting --max-seconds")
        run.add_argument("--budget-reserve", type=float, default=20,
                         help="seconds of --max-seconds kept for the final validation and checkpoint")
        run.add_argument("--out", required=True, help="run folder (checkpoint/, log.txt, metrics.jsonl)")
        run.add_argument("--eval-every", type=int, default=50, help="validate every N steps (0 = only at the end)")
        run.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps")
        run.add_argument("--log-every", type=int, default=1)
        run.add_argument("--val-rows", type=int, default=8, help="rows of the val split used for validation")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    torch.manual_seed(args.seed)
    train(args)
    return 0
