"""The per-loop metrics every report uses: perplexity, KL(teacher || model) and top-1 agreement with
the teacher, summed over predictions and averaged once at the end (training validation, the
evaluator, the default's export check)."""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F


class LoopTally:
    """Running sums per loop; ``add`` one batch's loop logits, ``result()`` the averages."""

    def __init__(self):
        self.sums: list[list[float]] | None = None  # per loop: [nll, kl, agreeing]
        self.count = 0

    def add(self, loop_logits, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> None:
        """``loop_logits``: one ``(..., V)`` tensor per loop predicting ``targets`` (same leading shape);
        ``teacher_logits`` likewise (no KL / agreement without it)."""
        targets = targets.reshape(-1)
        t_logp = None if teacher_logits is None else F.log_softmax(teacher_logits.float(), -1).reshape(targets.numel(), -1)
        rows = []
        for logits in loop_logits:
            s = F.log_softmax(logits.float(), -1).reshape(targets.numel(), -1)
            nll = float(F.nll_loss(s, targets, reduction="sum"))
            if t_logp is None:
                rows.append([nll, 0.0, 0.0])
            else:
                rows.append([nll, float((t_logp.exp() * (t_logp - s)).sum()), float((s.argmax(-1) == t_logp.argmax(-1)).sum())])
        if self.sums is None:
            self.sums = rows
        else:
            self.sums = [[a + b for a, b in zip(old, new)] for old, new in zip(self.sums, rows)]
        self.count += targets.numel()

    def result(self) -> dict:
        """``{"ppl": [...], "kl": [...], "agreement": [...], "tokens": n}``, one value per loop."""
        if not self.count:
            raise ValueError("no predictions were counted")
        return {"ppl": [math.exp(s[0] / self.count) for s in self.sums], "kl": [s[1] / self.count for s in self.sums],
                "agreement": [s[2] / self.count for s in self.sums], "tokens": self.count}
