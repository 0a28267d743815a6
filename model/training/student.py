"""The model being trained: conversion for ``uptrain``, halting heads for ``exits``, which parameters train."""
from __future__ import annotations


import torch



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


# --- model construction -------------------------------------------------------------------------
def build_uptrain_model(args, teacher):
    """``recursify`` the teacher as the flags say; ASVD-initialise the LoRA factors if asked."""
    from model.conversion.recursify import recursify

    rec = recursify(teacher, num_loops=args.loops, sharing=args.sharing, init=args.init,
                    lora_rank=args.lora_rank, block_size=args.block_size, base_name=args.base)
    if args.lora_init == "asvd" and args.lora_rank > 0:
        from model.conversion.asvd import apply_asvd_, cached_covariances

        covs = cached_covariances(teacher, args.base, num_sequences=args.calib_sequences,
                                  seq_len=args.seq_len, seed=args.seed + 1234)
        apply_asvd_(rec, teacher, covs, damping=args.asvd_damping)
    return rec


def add_halting_heads(model, width: int):
    """A copy of ``model`` with ``config.halting_hidden = width`` (fresh heads, other weights kept)."""
    from model.definition.modeling import RecursiveForCausalLM

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
