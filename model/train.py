"""Uptraining by distillation and early-exit post-training, on ``accelerate``, resumable.

Two commands (METHODS.md §3.4, §3.5, §3.8)::

    python -m model.train uptrain --base smollm2-135m --loops 2 --sharing middle_cycle --init average \\
        --lora-rank 128 --lora-init asvd --tokens 1M --out .cache/runs/rrt
    python -m model.train exits --from .cache/runs/rrt --tokens 300k --out .cache/runs/rrt-ee

``uptrain`` converts the base (``recursify``), optionally re-initialises the LoRA factors
activation-aware (``model.asvd``), and distils the teacher's next-token distribution into the
recursive model (forward or reverse KL at a temperature, optional CE term). ``uptrain --from <model>``
fine-tunes a trained model instead (e.g. ``default``; the conversion flags are then unused). ``exits`` continues
from an uptrained run with the RRT early-exit recipe (final loop weight 1; intermediate loops
"aggressive" ``c`` x (CE + KL toward the detached final loop)) and trains one halting head per loop
boundary (BCE toward ``1[argmax at loop r == argmax at the final loop]``).

Data: rows of the prose ``train`` split, or with ``--answers-share S`` a mix: global row ``n`` of the run
comes from the teacher's own chat answers (``model.teacher_answers.packed_rows("train", ...)``, prompt +
answer, forward KL on every position like the prose) when ``answer_row(n, S)``, so exactly
``floor(n * S)`` of the first ``n`` rows do, spread evenly; each stream keeps its own epoch and position.

A run folder holds ``checkpoint/`` (a loadable model folder plus ``trainer_state.pt``: optimizer,
scheduler, RNG, step, tokens seen and data position; replaced atomically), ``log.txt`` and
``metrics.jsonl``. Rerunning the same command resumes from ``checkpoint/``; a killed run loses at
most one ``--save-every`` interval. ``--tokens`` may be changed on resume (the cosine schedule is
re-shaped to the new total; the step, data position and optimizer state carry over). ``accelerate launch -m model.train ...`` runs the same code on
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from .folders import RUN_CHECKPOINT as CHECKPOINT
from .folders import run_model_folder

log = logging.getLogger("model.train")

TRAINER_STATE = "trainer_state.pt"


# --- small helpers ------------------------------------------------------------------------------
def parse_tokens(text: str) -> int:
    """``"300k"`` -> 300000, ``"1.5M"`` -> 1500000, ``"4096"`` -> 4096."""
    text = str(text).strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000, "b": 1_000_000_000}.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    try:
        value = float(number) * scale
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 4096, 300k, 1M)") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"token count must be positive, got {text!r}")
    return int(value)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
            kind: str = "forward_kl") -> torch.Tensor:
    """Mean per-token KL between teacher and student next-token distributions (x T^2).

    ``forward_kl``: KL(p_T || p_S) (mass-covering, the usual KD); ``reverse_kl``: KL(p_S || p_T).
    """
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    if kind == "forward_kl":
        kl = (t.exp() * (t - s)).sum(-1)
    elif kind == "reverse_kl":
        kl = (s.exp() * (s - t)).sum(-1)
    else:
        raise ValueError(f"unknown KD loss {kind!r}")
    return kl.mean() * temperature**2


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``ids[:, 1:]`` from ``logits[:, :-1]``."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def set_trainable(model: torch.nn.Module, which: str) -> list[str]:
    """``all``: every parameter; ``lora``: LoRA factors, RMSNorm weights and halting heads only
    (the shared block, embeddings and head frozen). Returns the trainable names."""
    names = []
    for name, param in model.named_parameters():
        router = name.startswith(("routers.", "token_router."))
        train = which == "all" or router or (which == "lora" and ("lora_" in name or "norm" in name
                                                                  or "halting_heads" in name))
        param.requires_grad_(train)
        if train:
            names.append(name)
    return names


class CosineWithWarmup:
    """LR factor: linear warm-up, then cosine decay to ``min_ratio`` at ``total_steps``.

    An object (not a closure) so that a time budget (``--max-seconds``) can shorten ``total_steps``
    mid-run; ``LambdaLR`` saves its attributes with the scheduler state.
    """

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float = 0.1):
        self.total_steps, self.warmup_steps, self.min_ratio = total_steps, warmup_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def fit_to_time(step: int, total_steps: int, steps_timed: int, seconds_timed: float, seconds_left: float) -> int:
    """The total step count that ends a run within ``seconds_left`` at the measured step rate."""
    per_step = seconds_timed / max(1, steps_timed)
    return max(step + 1, min(total_steps, step + int(seconds_left / max(per_step, 1e-9))))


@dataclass
class Progress:
    """Where a run stands; saved with every checkpoint."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # training tokens consumed (all processes)
    epoch: int = 0  # passes over the training split
    row: int = 0  # rows of this epoch's order consumed (all processes)
    answer_epoch: int = 0  # passes over the teacher-answer rows (--answers-share)
    answer_row: int = 0  # teacher-answer rows of this pass consumed
    answer_rows_seen: int = 0  # teacher-answer rows consumed in all passes
    wall_seconds: float = 0.0
    history: list = field(default_factory=list)  # validation records


# --- model construction -------------------------------------------------------------------------
def build_uptrain_model(args, teacher):
    """``recursify`` the teacher as the flags say; ASVD-initialise the LoRA factors if asked."""
    from .recursify import recursify

    rec = recursify(teacher, num_loops=args.loops, sharing=args.sharing, init=args.init,
                    lora_rank=args.lora_rank, block_size=args.block_size, base_name=args.base)
    if args.lora_init == "asvd" and args.lora_rank > 0:
        from .asvd import apply_asvd_, cached_covariances

        covs = cached_covariances(teacher, args.base, num_sequences=args.calib_sequences,
                                  seq_len=args.seq_len, seed=args.seed + 1234)
        apply_asvd_(rec, teacher, covs, damping=args.asvd_damping)
    return rec


def add_halting_heads(model, width: int):
    """A copy of ``model`` with ``config.halting_hidden = width`` (fresh heads, other weights kept)."""
    from .modeling import RecursiveForCausalLM

    if model.config.halting_hidden == width:
        return model
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.halting_hidden = width
    torch.manual_seed(0)
    new = RecursiveForCausalLM(config).to(next(model.parameters()).dtype)
    result = new.load_state_dict(model.state_dict(), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(k.startswith("halting_heads") or k == "lm_head.weight" for k in result.missing_keys), result.missing_keys
    new.tie_weights()
    return new


# --- losses per stage -----------------------------------------------------------------------------
def uptrain_loss(model, teacher_logits, ids, args) -> tuple[torch.Tensor, dict]:
    logits = model(input_ids=ids).logits
    kd = kd_loss(logits, teacher_logits, args.kd, args.loss)
    loss = kd
    ce = next_token_ce(logits, ids) if args.ce_weight > 0 else None
    if ce is not None:
        loss = loss + args.ce_weight * ce
    return loss, {"kd": float(kd.detach()), **({"ce": float(ce.detach())} if ce is not None else {})}


def exits_loss(model, teacher_logits, ids, args) -> tuple[torch.Tensor, dict]:
    """RRT post-training: final loop as in uptraining; each earlier loop c*(CE + KL to detached final);
    halting heads by BCE on detached hidden states."""
    unwrapped = getattr(model, "module", model)
    out = model(input_ids=ids, output_loop_logits=True)
    final = out.loop_logits[-1]
    kd = kd_loss(final, teacher_logits, args.kd, args.loss)
    loss, stats = kd, {"kd": float(kd.detach())}
    final_top = final.detach().argmax(-1)
    for r, logits in enumerate(out.loop_logits[:-1], start=1):
        ce = next_token_ce(logits, ids)
        self_kd = kd_loss(logits, final.detach(), 1.0, "forward_kl")
        loss = loss + args.exit_weight * (ce + args.self_kd_weight * self_kd)
        target = (logits.detach().argmax(-1) == final_top).float()
        normed = unwrapped.model.norm(out.loop_hidden_states[r - 1].detach()).detach()
        halt = unwrapped.halting_heads[r - 1](normed)
        bce = F.binary_cross_entropy_with_logits(halt.float(), target)
        loss = loss + args.halting_weight * bce
        stats.update({f"ce_loop{r}": float(ce.detach()), f"self_kd_loop{r}": float(self_kd.detach()), f"bce_loop{r}": float(bce.detach()),
                      f"agree_loop{r}": float(target.mean())})
    return loss, stats


# --- validation ---------------------------------------------------------------------------------
@torch.no_grad()
def validate(model, teacher, batches: list[torch.Tensor], device) -> dict:
    """Per-loop perplexity, KL to the teacher and top-1 agreement on fixed validation rows."""
    was_training = model.training
    model.eval()
    nll, kl, agree, count = None, None, None, 0
    for ids in batches:
        ids = ids.to(device)
        t = teacher(input_ids=ids).logits[:, :-1].float()
        loops = model(input_ids=ids, output_loop_logits=True).loop_logits
        n = ids[:, 1:].numel()
        t_logp = F.log_softmax(t, -1)
        per = []
        for logits in loops:
            s = F.log_softmax(logits[:, :-1].float(), -1)
            per.append((float(F.nll_loss(s.reshape(-1, s.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")),
                        float((t_logp.exp() * (t_logp - s)).sum()),
                        float((s.argmax(-1) == t.argmax(-1)).sum())))
        nll = [p[0] for p in per] if nll is None else [a + p[0] for a, p in zip(nll, per)]
        kl = [p[1] for p in per] if kl is None else [a + p[1] for a, p in zip(kl, per)]
        agree = [p[2] for p in per] if agree is None else [a + p[2] for a, p in zip(agree, per)]
        count += n
    model.train(was_training)
    return {"ppl": [math.exp(x / count) for x in nll], "kl": [x / count for x in kl],
            "agreement": [x / count for x in agree], "tokens": count}


# --- checkpointing --------------------------------------------------------------------------------
def save_run_checkpoint(out: Path, model, tokenizer, optimizer, scheduler, progress: Progress) -> None:
    """Model folder + trainer state, swapped in atomically (a crash leaves the previous one intact)."""
    from .checkpoint import atomic_write_folder

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save({
            "progress": asdict(progress),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }, tmp / TRAINER_STATE)

    atomic_write_folder(out / CHECKPOINT, write)


def load_trainer_state(out: Path) -> dict | None:
    """The saved trainer state of a run, or None; a checkpoint swap cut short by a crash is undone first."""
    from .checkpoint import recover_folder

    path = recover_folder(out / CHECKPOINT) / TRAINER_STATE
    return torch.load(path, weights_only=False) if path.exists() else None


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
    from .checkpoint import load_model
    from .data import iter_batches, load_split

    if not 0 <= args.answers_share <= 1:
        raise ValueError(f"--answers-share must be in [0, 1], got {args.answers_share}")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m model.train " + " ".join(shlex.quote(a) for a in args.argv)

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
        from .train_routers import build_router_model

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
        from .train_routers import routers_loss

        def loss_fn(model, teacher_logits, ids, args):
            return routers_loss(model, teacher_logits, ids, args, kd_loss, progress.step)
    else:
        loss_fn = exits_loss if args.stage == "exits" or getattr(args, "with_exits", False) else uptrain_loss
    unwrapped = accelerator.unwrap_model(model)

    def checkpoint(final: bool = False) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            unwrapped.config.training = _provenance(unwrapped.config.training, args, command, progress, final,
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
    batches = _batches(iter_batches, args, progress, world, accelerator.process_index)
    micro, stats = 0, {}
    while progress.step < total_steps:
        ids = next(batches).to(device)
        with accelerator.accumulate(model):
            with torch.no_grad(), accelerator.autocast():
                teacher_logits = teacher(input_ids=ids).logits
            with accelerator.autocast():
                loss, stats = loss_fn(model, teacher_logits, ids, args)
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
            total_steps = _fit_budget(args, progress, schedule, first_step, started, total_steps, rows_per_step, bar,
                                      timing)
        progress.wall_seconds = wall_at_start + time.time() - started
        rate = progress.tokens_seen / max(progress.wall_seconds, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", tok_s=f"{rate:.0f}")
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


def _fit_budget(args, progress: Progress, schedule: CosineWithWarmup, first_step: int, started: float,
                total_steps: int, rows_per_step: int, bar, timing: dict) -> int:
    """``--max-seconds``: every ``--budget-probe`` steps, refit the schedule's end to the time left at
    the recent step rate (the first step, with its warm-up costs, is not timed; never past ``--tokens``)."""
    now = time.time()
    if now - started > args.max_seconds - args.budget_reserve / 2 and total_steps > progress.step:
        log.info("time budget %.0f s spent: stopping at step %d", args.max_seconds, progress.step)
        schedule.total_steps = bar.total = progress.step
        return progress.step
    if progress.step == first_step + 1:
        timing.update(window_start=now, window_step=progress.step, planned=total_steps)
        return total_steps
    if "window_start" not in timing or progress.step - timing["window_step"] < args.budget_probe:
        return total_steps
    seconds_left = args.max_seconds - (now - started) - args.budget_reserve
    fitted = fit_to_time(progress.step, timing["planned"], progress.step - timing["window_step"],
                         now - timing["window_start"], seconds_left)
    timing.update(window_start=now, window_step=progress.step)
    if fitted != total_steps:
        log.info("time budget %.0f s: run ends at step %d (%.2fM tokens; planned %d)", args.max_seconds, fitted,
                 fitted * rows_per_step * args.seq_len / 1e6, timing["planned"])
        schedule.total_steps = fitted
        bar.total = fitted
    return fitted


def answer_row(index: int, share: float) -> bool:
    """Whether global row ``index`` of a run comes from the teacher answers: exactly ``floor(n * share)``
    of the first ``n`` rows do, spread evenly (a pure function of the index, so resuming needs no state)."""
    return math.floor((index + 1) * share + 1e-9) > math.floor(index * share + 1e-9)


def _batches(iter_batches, args, progress: Progress, world: int, rank: int):
    """Endless per-process micro-batches, starting at the saved position: each global batch takes its
    rows from the prose split and (``--answers-share``) the teacher answers by ``answer_row``; the
    positions in ``progress`` count the rows handed out."""
    global_size = args.batch_size * world
    index = progress.tokens_seen // args.seq_len  # global rows consumed so far
    prose = _prose_rows(iter_batches, args, progress)
    answers = _answer_rows(args, progress) if args.answers_share > 0 else None
    while True:
        rows = [next(answers) if answers is not None and answer_row(index + i, args.answers_share) else next(prose)
                for i in range(global_size)]
        index += global_size
        yield torch.stack(rows[rank * args.batch_size : (rank + 1) * args.batch_size])


def _prose_rows(iter_batches, args, progress: Progress):
    """Rows of the prose ``train`` split in the seeded order of each epoch."""
    while True:
        for batch in iter_batches("train", 1, args.seq_len, seed=args.seed + progress.epoch, start_row=progress.row):
            progress.row += 1
            yield batch[0]
        progress.epoch += 1
        progress.row = 0


def _answer_rows(args, progress: Progress):
    """Rows of the teacher's answers (``train`` split only), packed anew in a seeded order each pass."""
    from . import teacher_answers

    while True:
        rows = teacher_answers.packed_rows("train", args.seq_len, seed=args.seed + progress.answer_epoch)
        if len(rows) == 0:
            raise ValueError(f"no teacher-answer rows of {args.seq_len} tokens; generate and export answers first")
        for row in rows[progress.answer_row:]:
            progress.answer_row += 1
            progress.answer_rows_seen += 1
            yield row
        progress.answer_epoch += 1
        progress.answer_row = 0


def _provenance(previous: dict | None, args, command: str, progress: Progress, final: bool,
                device_name: str = "CPU", inherited: int = 0) -> dict:
    """``config.training``: every stage's command, data, tokens, seed and last validation.

    ``inherited``: how many of ``previous``'s stages came with the starting model; a record after them is
    this run's own (from an earlier checkpoint of this run) and is updated."""
    stages = list((previous or {}).get("stages", []))
    data = {"split": "train", "seq_len": args.seq_len, "order_seed": args.seed,
            "epoch": progress.epoch, "rows_consumed": progress.row}
    if args.answers_share > 0:
        data.update(_answers_provenance(args, progress))
    record = {
        "stage": args.stage, "command": command, "complete": final,
        "data": data,
        "tokens_seen": progress.tokens_seen, "steps": progress.step, "seed": args.seed,
        "wall_seconds": round(progress.wall_seconds),
        "device": device_name,
        "val": progress.history[-1] if progress.history else None,
        "val_rows": args.val_rows,
    }
    if len(stages) > inherited:
        # a resumed or extended (re-budgeted) run of the same stage: progress is cumulative, so one
        # record, every invocation kept
        stages = stages[: inherited + 1]
        record["commands"] = list(dict.fromkeys(stages[-1].get("commands", [stages[-1]["command"]]) + [command]))
        stages[-1] = record
    else:
        record["commands"] = [command]
        stages.append(record)
    return {"stages": stages, "tokens_seen": sum(s["tokens_seen"] for s in stages)}


def _answers_provenance(args, progress: Progress) -> dict:
    """The mix and the teacher-answer set it drew from (``--answers-share``)."""
    from .teacher_answers import ASSET_FOLDER, read_manifest

    manifest = read_manifest(ASSET_FOLDER) if (ASSET_FOLDER / "manifest.json").exists() else {}
    prose_rows = progress.tokens_seen // args.seq_len - progress.answer_rows_seen
    return {"answers_share": args.answers_share, "answer_rows_consumed": progress.answer_rows_seen,
            "answer_epoch": progress.answer_epoch, "answer_row": progress.answer_row,
            "tokens_from_answers": progress.answer_rows_seen * args.seq_len,
            "tokens_from_prose": prose_rows * args.seq_len,
            "answers_set": {"split": "train", "exported_at": manifest.get("exported_at"),
                            **{k: manifest.get("splits", {}).get("train", {}).get(k)
                               for k in ("records", "prompt_tokens", "answer_tokens")}}}


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
    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n\n")[0])
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
    ro = sub.add_parser("routers", help="Mixture-of-Recursions routers on a trained run (model/train_routers.py)")
    from .train_routers import add_router_arguments

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


if __name__ == "__main__":
    sys.exit(main())
