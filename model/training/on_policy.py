"""On-policy distillation (GKD, Agarwal et al. 2024; MiniLLM, Gu et al. 2024): the student writes some of
the answers it is distilled on.

With ``--on-policy-share P`` (needs ``--answers-share S > 0``) a share ``P`` of the rows that would come from
the teacher's answers are built from the same train prompts with the *student's* own answers instead: the
student (full depth, no grad, its weights at the start of the optimizer step) samples up to
``--on-policy-tokens N`` new tokens per prompt (temperature / top-p, stop at the end of the chat turn), the
teacher scores prompt + answer like any other row (forward KL on its logits at every position), and any
padding at the end of the row is masked out of the loss.

Which rows: the answer rows are counted (answer row ``k`` is global row ``n`` with ``k = floor(n * S)``) and
answer row ``k`` is on-policy when ``rows.answer_row(k, P)``: a pure function of the index, like the mix itself.

One on-policy row = conversations ``prompt + answer + EOS`` back to back (the layout of
``answer_store.packed_rows``), taken from the deduplicated train prompts in a seeded order per pass while
their planned length ``len(prompt) + N * ANSWER_ESTIMATE + 1`` fits the row; the row is then cut at
``--seq-len`` (the last answer may lose its end, as packed rows do) or padded. So a row's prompts are known
before anything is sampled (they depend on prompt lengths only). Each conversation's sample uses its own
generator seeded by (run seed, pass, position), so a row does not depend on its batch, and the position
(``Progress.on_policy_epoch`` / ``on_policy_prompt``) is saved with every checkpoint: resuming is exact. All
on-policy rows of one optimizer step are generated in one batched call (left padding, a 4-D mask and per-row
positions), since the weights do not change between its micro-batches.

This is GKD's mixed on-/off-policy data with its forward-KL divergence (``--loss reverse_kl`` gives the
token-level reverse KL on the same rows); MiniLLM's sequence-level policy gradient is not implemented.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from model.data.teacher_answers import RowSampler, cut_at_eos, left_padded
from model.training.run_state import Progress

GENERATION_BATCH = 64  # prompts per batched generation call (sorted by length: little padding)
# planned answer length as a share of --on-policy-tokens: budgeting the worst case (1.0) left 45 % of the
# on-policy rows as padding in the CPU smoke run (the default's answers averaged 72 of 128 tokens); 0.5 left
# 5 %, at the price of 19 % of the sampled tokens falling past a row's end (docs/TRAINING.md)
ANSWER_ESTIMATE = 0.5


@dataclass(frozen=True)
class OnPolicySettings:
    share: float  # of the teacher-answer rows
    max_new_tokens: int = 128
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9

    @classmethod
    def from_args(cls, args) -> "OnPolicySettings":
        return cls(args.on_policy_share, args.on_policy_tokens, args.on_policy_temperature, args.on_policy_top_p)

    def validate(self, args) -> None:
        if not 0 <= self.share <= 1:
            raise ValueError(f"--on-policy-share must be in [0, 1], got {self.share}")
        if self.share > 0 and args.answers_share <= 0:
            raise ValueError("--on-policy-share replaces a share of the teacher-answer rows: give --answers-share > 0")
        if self.max_new_tokens < 1 or self.max_new_tokens + 2 > args.seq_len:
            raise ValueError(f"--on-policy-tokens must be in 1..{args.seq_len - 2} (--seq-len {args.seq_len})")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("--on-policy-temperature must be >= 0 and --on-policy-top-p in (0, 1]")


# --- batched sampling at full depth -----------------------------------------------------------------
def padded_attention(keep: torch.Tensor, q_len: int) -> torch.Tensor:
    """Additive ``(B, 1, q_len, kv)`` mask: causal over the last ``q_len`` of the ``kv`` keys with padding
    (``keep`` False) hidden; a padding query sees only itself, so no row is empty (no NaN, even in fp16)."""
    batch, kv = keep.shape
    causal = torch.ones(q_len, kv, dtype=torch.bool, device=keep.device).tril(kv - q_len)
    itself = torch.zeros(q_len, kv, dtype=torch.bool, device=keep.device)
    itself[torch.arange(q_len), torch.arange(kv - q_len, kv)] = True
    allowed = (causal[None] & keep[:, None, :]) | itself[None]
    return torch.zeros(allowed.shape, device=keep.device).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


@torch.no_grad()
def sample_answers(model, prompts: list[list[int]], seeds: list[int | None], eos_id: int,
                   settings: OnPolicySettings) -> list[list[int]]:
    """Answers of ``model`` (full depth) to ``prompts``, batched with left padding, each cut after its first
    EOS. Row ``i`` samples with its own generator seeded ``seeds[i]`` (one uniform per step, the teacher
    answers' ``RowSampler``: temperature, top-p), so its answer does not depend on its batch; a seed of
    None or a temperature of 0 takes the argmax."""
    from transformers.cache_utils import DynamicCache

    device = next(model.parameters()).device
    sampler = RowSampler([s if settings.temperature > 0 else None for s in seeds], settings.temperature or 1.0,
                         settings.top_p)
    ids, keep = left_padded(prompts, eos_id)
    ids, keep = ids.to(device), keep.bool().to(device)
    positions = (keep.long().cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache()
    logits = model(input_ids=ids, position_ids=positions, attention_mask=padded_attention(keep, ids.shape[1]),
                   past_key_values=cache, use_cache=True).logits[:, -1]
    tokens, done, next_position = [], torch.zeros(len(prompts), dtype=torch.bool, device=device), positions[:, -1] + 1
    for step in range(settings.max_new_tokens):
        # sampled rows come back one-hot on their draw, greedy rows unchanged: the argmax is the token
        token = sampler(ids, logits.float()).argmax(-1).masked_fill(done, eos_id)
        tokens.append(token)
        done |= token == eos_id
        if step == settings.max_new_tokens - 1 or bool(done.all()):
            break
        keep = torch.cat([keep, torch.ones(len(prompts), 1, dtype=torch.bool, device=device)], 1)
        logits = model(input_ids=token[:, None], position_ids=next_position[:, None],
                       attention_mask=padded_attention(keep, 1), past_key_values=cache, use_cache=True).logits[:, -1]
        next_position = next_position + 1
    return [cut_at_eos(row, eos_id)[0] for row in torch.stack(tokens, 1).tolist()]


def student_sampler(model, autocast, eos_id: int, settings: OnPolicySettings):
    """``sample(prompts, seeds) -> answers`` with ``model`` in eval mode (restored after), under ``autocast``."""
    def sample(prompts: list[list[int]], seeds: list[int]) -> list[list[int]]:
        was_training = model.training
        model.eval()
        try:
            with autocast():
                return sample_answers(model, prompts, seeds, eos_id, settings)
        finally:
            model.train(was_training)

    return sample


# --- the rows ------------------------------------------------------------------------------------------
def train_prompts() -> list[list[int]]:
    """The train split's distinct prompts (chat template, ending with the assistant header), in file order."""
    from model.data import answer_store

    seen: dict[str, list[int]] = {}
    for answer in answer_store.load_answers("train"):
        seen.setdefault(answer.key, answer.prompt_ids)
    return list(seen.values())


def conversation_seed(seed: int, epoch: int, position: int) -> int:
    digest = hashlib.sha256(f"on-policy:{seed}:{epoch}:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class OnPolicyRows:
    """Plans on-policy rows from the saved position (``progress``) and fills them with ``sample``'s answers."""

    def __init__(self, args, progress: Progress, sample, eos_id: int, prompts: list[list[int]] | None = None):
        self.settings = OnPolicySettings.from_args(args)
        self.seq_len, self.seed, self.progress, self.sample, self.eos_id = args.seq_len, args.seed, progress, sample, eos_id
        self.prompts = train_prompts() if prompts is None else prompts
        answer = math.ceil(self.settings.max_new_tokens * ANSWER_ESTIMATE)
        self.cost = [len(p) + answer + 1 for p in self.prompts]  # planned: prompt, answer, EOS
        if not any(len(p) + 2 <= self.seq_len for p in self.prompts):
            raise ValueError(f"no train prompt leaves room for an answer in a row of {self.seq_len} tokens")
        self.orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self.orders:  # a new seeded order each pass, like the teacher-answer rows
            self.orders = {epoch: np.random.default_rng(self.seed + epoch).permutation(len(self.prompts))}
        return self.orders[epoch]

    def plan_row(self) -> list[tuple[list[int], int]]:
        """The next row's ``(prompt, seed)`` pairs; advances the saved position past them."""
        p, budget, planned = self.progress, self.seq_len, []
        while True:
            order = self.order(p.on_policy_epoch)
            if p.on_policy_prompt >= len(order):
                p.on_policy_epoch, p.on_policy_prompt = p.on_policy_epoch + 1, 0
                continue
            index = int(order[p.on_policy_prompt])
            if len(self.prompts[index]) + 2 > self.seq_len:  # no room for an answer in any row: skipped
                p.on_policy_prompt += 1
                continue
            if planned and self.cost[index] > budget:
                return planned
            planned.append((self.prompts[index], conversation_seed(self.seed, p.on_policy_epoch, p.on_policy_prompt)))
            budget -= self.cost[index]
            p.on_policy_prompt += 1
            if budget <= 0:
                return planned

    def rows(self, count: int, mine: list[bool]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """``count`` rows in order, as ``(ids, mask)``; only those marked ``mine`` are sampled (the others
        belong to other processes: planned, so the position advances, but None)."""
        plans = [self.plan_row() for _ in range(count)]
        self.progress.on_policy_rows_seen += count
        wanted = [(r, c) for r, plan in enumerate(plans) if mine[r] for c in range(len(plan))]
        tic = time.monotonic()
        order = sorted(range(len(wanted)), key=lambda j: len(plans[wanted[j][0]][wanted[j][1]][0]))
        answers: dict[tuple[int, int], list[int]] = {}
        for start in range(0, len(order), GENERATION_BATCH):
            batch = [wanted[j] for j in order[start: start + GENERATION_BATCH]]
            out = self.sample([plans[r][c][0] for r, c in batch], [plans[r][c][1] for r, c in batch])
            answers.update(zip(batch, out))
        self.progress.on_policy_seconds += time.monotonic() - tic
        result = []
        for r, plan in enumerate(plans):
            if not mine[r]:
                result.append(None)
                continue
            row = [t for c, (prompt, _) in enumerate(plan) for t in (*prompt, *answer_body(answers[r, c], self.eos_id),
                                                                        self.eos_id)]
            self.progress.on_policy_cut += max(0, len(row) - self.seq_len)
            row = row[: self.seq_len]
            real = len(row)
            self.progress.on_policy_tokens_sampled += sum(len(answers[r, c]) for c in range(len(plan)))
            self.progress.on_policy_conversations += len(plan)
            self.progress.on_policy_padding += self.seq_len - real
            ids = torch.tensor(row + [self.eos_id] * (self.seq_len - real), dtype=torch.long)
            mask = torch.arange(self.seq_len) < real
            result.append((ids, mask))
        return result


def answer_body(answer: list[int], eos_id: int) -> list[int]:
    """The answer without its closing EOS (the row appends one after every conversation, as packing does)."""
    return answer[:-1] if answer and answer[-1] == eos_id else answer
