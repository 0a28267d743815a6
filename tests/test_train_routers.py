"""The routers stage: a few optimizer steps reduce the routed KD loss and teach the decode rule."""
from __future__ import annotations

import argparse

import pytest
import torch
from torch.nn import functional as F

from model import recursify
from model.training.routers import build_router_model, parse_capacity, routers_loss
from tests.conftest import tiny_llama
from tests.test_train import tiny_run, uptrain_args  # noqa: F401  (the tiny-run fixture: synthetic data splits)


def kd(student, teacher, temperature=1.0, kind="forward_kl"):
    return F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                    log_target=True, reduction="batchmean")


@pytest.mark.parametrize("routing", ["expert", "token"])
def test_router_training_steps_reduce_the_loss(routing):
    teacher = tiny_llama()
    student = recursify(teacher, num_loops=3, lora_rank=4)
    args = argparse.Namespace(routing=routing, capacity=parse_capacity("1,0.67,0.33"), router_alpha=0.1,
                              aux_coeff=1e-2, balance="loss", balance_coeff=0.1, z_coeff=1e-5, bal_warmup=0,
                              kd=1.0, loss="forward_kl", seed=0)
    mor = build_router_model(student, args).train()
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t = teacher(ids).logits
    opt = torch.optim.Adam([p for p in mor.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(25):
        loss, stats = routers_loss(mor, t, ids, args, kd, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] * 0.8
    if routing == "expert":  # capacity 1, 0.67, 0.33 of 32 tokens keeps 32, 21, 10: depths 1x11, 2x11, 3x10
        assert stats["avg_depth"] == pytest.approx((11 * 1 + 11 * 2 + 10 * 3) / 32)
    else:  # token-choice: every token gets exactly one depth
        assert sum(stats[f"tokens_depth{d}"] for d in (1, 2, 3)) == 4 * 32
    grad = mor.routers.routers[1].weight if routing == "expert" else mor.token_router.proj.weight
    assert grad.abs().sum() > 0


def test_capacity_flag_is_validated():
    assert parse_capacity("1,0.5") == [1.0, 0.5]
    for bad in ("1,x", "0.5,1", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_capacity(bad)


def test_routers_command_trains_from_a_run(tiny_run):
    """``python -m model.training routers`` end to end on a tiny run (synthetic data, as in test_train)."""
    import json

    from model.training import train as T
    from model.io.checkpoint import load_model

    tmp, base = tiny_run
    T.train(uptrain_args(base, tmp / "rrt", steps=2))
    argv = ["routers", "--from", str(tmp / "rrt"), "--base", str(base), "--routing", "expert", "--capacity", "1,0.5",
            "--tokens", str(4 * 2 * 2 * 16), "--seq-len", "16", "--batch-size", "2", "--grad-accum", "2",
            "--eval-every", "0", "--save-every", "2", "--val-rows", "2", "--train", "routers", "--out", str(tmp / "mor")]
    args = T.build_parser().parse_args(argv)
    args.argv = argv
    T.train(args)
    records = [json.loads(l) for l in (tmp / "mor" / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert len(records) == 4 and all("router_aux" in r and "sampling_accuracy" in r for r in records)
    mor = load_model(tmp / "mor" / "checkpoint")[0]
    assert mor.config.router_type == "expert" and mor.config.router_capacity == [1.0, 0.5]
    rrt = load_model(tmp / "rrt" / "checkpoint")[0]  # --train routers leaves the relaxed model as it was
    torch.testing.assert_close(mor.model.layers[1].self_attn.q_proj.lora_A, rrt.model.layers[1].self_attn.q_proj.lora_A)


def test_router_overlay_artifact_rebuilds_the_routed_model(tiny_run, monkeypatch):
    """default-mor is stored as an overlay on the default artifact: just the routers."""
    from model.io import default as D
    from model.training import train as T
    from model.io.checkpoint import load_model
    from model.paths import cache_dir

    tmp, base = tiny_run
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp / "cache"))
    T.train(uptrain_args(base, tmp / "rrt", steps=2))
    argv = ["routers", "--from", str(tmp / "rrt"), "--base", str(base), "--routing", "token", "--tokens", "128",
            "--seq-len", "16", "--batch-size", "2", "--grad-accum", "2", "--eval-every", "0", "--val-rows", "2",
            "--train", "routers", "--out", str(tmp / "mor")]
    args = T.build_parser().parse_args(argv)
    args.argv = argv
    T.train(args)
    D.export_artifact(tmp / "rrt", tmp / "assets" / "default", int8=False)
    info = D.export_overlay(tmp / "mor", tmp / "assets" / "default-mor", base=tmp / "assets" / "default")
    assert info["tensors"] and all(k.startswith("token_router.") for k in info["tensors"])
    rebuilt = load_model(D.default_folder(tmp / "assets" / "default-mor"))[0]
    trained = load_model(tmp / "mor" / "checkpoint")[0]
    ids = torch.randint(0, 256, (1, 12))
    torch.testing.assert_close(rebuilt(ids).logits, trained(ids).logits, atol=1e-5, rtol=1e-5)
    assert rebuilt.config.router_type == "token" and str(cache_dir()).startswith(str(tmp))
