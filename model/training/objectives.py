"""The distillation objectives: KD and next-token CE, and the loss of each stage (``uptrain``, ``exits``)."""
from __future__ import annotations


import torch
from torch.nn import functional as F



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
