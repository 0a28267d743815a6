"""The distillation objectives: KD and next-token CE, and the loss of each stage (``uptrain``, ``exits``).

Every loss takes an optional ``mask`` ``(batch, seq)``, False on padding (the end of on-policy rows,
``model.training.on_policy``): means are then over the real positions only; None keeps the plain mean."""
from __future__ import annotations


import torch
from torch.nn import functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``values.mean()``, or the mean over the positions where ``mask`` is True."""
    if mask is None:
        return values.mean()
    weight = mask.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
            kind: str = "forward_kl", mask: torch.Tensor | None = None) -> torch.Tensor:
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
    return masked_mean(kl, mask) * temperature**2


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of predicting ``ids[:, 1:]`` from ``logits[:, :-1]`` (targets on padding left out)."""
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    if mask is None:
        return F.cross_entropy(flat, ids[:, 1:].reshape(-1))
    return masked_mean(F.cross_entropy(flat, ids[:, 1:].reshape(-1), reduction="none"), mask[:, 1:].reshape(-1))


# --- losses per stage -----------------------------------------------------------------------------
def uptrain_loss(model, teacher_logits, ids, args, mask=None) -> tuple[torch.Tensor, dict]:
    logits = model(input_ids=ids).logits
    kd = kd_loss(logits, teacher_logits, args.kd, args.loss, mask)
    loss = kd
    ce = next_token_ce(logits, ids, mask) if args.ce_weight > 0 else None
    if ce is not None:
        loss = loss + args.ce_weight * ce
    return loss, {"kd": float(kd.detach()), **({"ce": float(ce.detach())} if ce is not None else {})}


def exits_loss(model, teacher_logits, ids, args, mask=None) -> tuple[torch.Tensor, dict]:
    """RRT post-training: final loop as in uptraining; each earlier loop c*(CE + KL to detached final);
    halting heads by BCE on detached hidden states."""
    unwrapped = getattr(model, "module", model)
    out = model(input_ids=ids, output_loop_logits=True)
    final = out.loop_logits[-1]
    kd = kd_loss(final, teacher_logits, args.kd, args.loss, mask)
    loss, stats = kd, {"kd": float(kd.detach())}
    final_top = final.detach().argmax(-1)
    for r, logits in enumerate(out.loop_logits[:-1], start=1):
        ce = next_token_ce(logits, ids, mask)
        self_kd = kd_loss(logits, final.detach(), 1.0, "forward_kl", mask)
        loss = loss + args.exit_weight * (ce + args.self_kd_weight * self_kd)
        target = (logits.detach().argmax(-1) == final_top).float()
        normed = unwrapped.model.norm(out.loop_hidden_states[r - 1].detach()).detach()
        halt = unwrapped.halting_heads[r - 1](normed)
        bce = F.binary_cross_entropy_with_logits(halt.float(), target) if mask is None else \
            masked_mean(F.binary_cross_entropy_with_logits(halt.float(), target, reduction="none"), mask)
        loss = loss + args.halting_weight * bce
        stats.update({f"ce_loop{r}": float(ce.detach()), f"self_kd_loop{r}": float(self_kd.detach()), f"bce_loop{r}": float(bce.detach()),
                      f"agree_loop{r}": float(masked_mean(target, mask))})
    return loss, stats
