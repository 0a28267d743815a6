"""Where a run stands and how it resumes: token counts, the LR schedule and time budget, ``Progress``,
checkpoints with the trainer state, and the provenance written into ``config.training``."""
from __future__ import annotations

import argparse
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.io.folders import RUN_CHECKPOINT as CHECKPOINT

log = logging.getLogger(__name__)

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
    on_policy_epoch: int = 0  # passes over the train prompts answered by the student (--on-policy-share)
    on_policy_prompt: int = 0  # prompts of this pass consumed
    on_policy_rows_seen: int = 0  # on-policy rows (all processes)
    on_policy_conversations: int = 0  # conversations in them (this process's rows)
    on_policy_tokens_sampled: int = 0  # answer tokens the student sampled (this process's rows)
    on_policy_padding: int = 0  # masked padding tokens at the end of on-policy rows (this process's rows)
    on_policy_cut: int = 0  # conversation tokens past the end of their row, left out (this process's rows)
    on_policy_seconds: float = 0.0  # wall-clock spent sampling
    wall_seconds: float = 0.0
    history: list = field(default_factory=list)  # validation records


# --- checkpointing --------------------------------------------------------------------------------
def save_run_checkpoint(out: Path, model, tokenizer, optimizer, scheduler, progress: Progress) -> None:
    """Model folder + trainer state, swapped in atomically (a crash leaves the previous one intact)."""
    from model.io.checkpoint import atomic_write_folder

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
    from model.io.checkpoint import recover_folder

    path = recover_folder(out / CHECKPOINT) / TRAINER_STATE
    return torch.load(path, weights_only=False) if path.exists() else None


def fit_budget(args, progress: Progress, schedule: CosineWithWarmup, first_step: int, started: float,
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


def provenance(previous: dict | None, args, command: str, progress: Progress, final: bool,
                device_name: str = "CPU", inherited: int = 0) -> dict:
    """``config.training``: every stage's command, data, tokens, seed and last validation.

    ``inherited``: how many of ``previous``'s stages came with the starting model; a record after them is
    this run's own (from an earlier checkpoint of this run) and is updated."""
    stages = list((previous or {}).get("stages", []))
    data = {"split": "train", "seq_len": args.seq_len, "order_seed": args.seed,
            "epoch": progress.epoch, "rows_consumed": progress.row}
    if args.answers_share > 0:
        data.update(answers_provenance(args, progress))
    if getattr(args, "on_policy_share", 0) > 0:
        data.update(on_policy_provenance(args, progress))
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


def answers_provenance(args, progress: Progress) -> dict:
    """The mix and the teacher-answer set it drew from (``--answers-share``)."""
    from model.data.answer_store import ASSET_FOLDER, read_manifest

    manifest = read_manifest(ASSET_FOLDER) if (ASSET_FOLDER / "manifest.json").exists() else {}
    prose_rows = progress.tokens_seen // args.seq_len - progress.answer_rows_seen - progress.on_policy_rows_seen
    return {"answers_share": args.answers_share, "answer_rows_consumed": progress.answer_rows_seen,
            "answer_epoch": progress.answer_epoch, "answer_row": progress.answer_row,
            "tokens_from_answers": progress.answer_rows_seen * args.seq_len,
            "tokens_from_prose": prose_rows * args.seq_len,
            "answers_set": {"split": "train", "exported_at": manifest.get("exported_at"),
                            **{k: manifest.get("splits", {}).get("train", {}).get(k)
                               for k in ("records", "prompt_tokens", "answer_tokens")}}}


def on_policy_provenance(args, progress: Progress) -> dict:
    """The student-sampled share (``--on-policy-share``): rows, tokens the student wrote, padding, time."""
    return {"on_policy_share": args.on_policy_share, "on_policy_rows_consumed": progress.on_policy_rows_seen,
            "tokens_from_on_policy": progress.on_policy_rows_seen * args.seq_len,
            "on_policy_conversations": progress.on_policy_conversations,
            "tokens_sampled_by_student": progress.on_policy_tokens_sampled,
            "on_policy_padding_tokens": progress.on_policy_padding, "on_policy_cut_tokens": progress.on_policy_cut,
            "on_policy_epoch": progress.on_policy_epoch, "on_policy_prompt": progress.on_policy_prompt,
            "on_policy_sampling": {"max_new_tokens": args.on_policy_tokens, "temperature": args.on_policy_temperature,
                                   "top_p": args.on_policy_top_p, "model": "the student at full depth, no grad, "
                                   "its weights at the start of each optimizer step"},
            "on_policy_sampling_seconds": round(progress.on_policy_seconds, 1)}
