"""Mixture-of-Recursions: routed KV semantics, routers, decode-time routing (tiny random models)."""
from __future__ import annotations

import pytest
import torch

from model import RecursiveForCausalLM
from model import generate
from model import recursify
from model.inference.decoder import AdaptiveDecoder
from model.errors import EngineInputError
from model.inference.policies import DepthPolicy, Router
from model.conversion.recursify import add_routers
from model.definition.routers import expert_choice_forward, routed_forward, share_mask, token_choice_forward
from tests.conftest import tiny_llama


class Scheduled(DepthPolicy):
    """Stops each token at a depth given in advance (to compare KV modes for the same depths)."""

    def __init__(self, depths):
        self.depths, self.i = list(depths), -1

    def decide(self, obs):
        if obs.loop == 1:
            self.i += 1
        return obs.loop >= self.depths[self.i], "scheduled"


@pytest.mark.parametrize("kv_mode", ["recursion", "share"])
@pytest.mark.parametrize("sharing", ["cycle", "middle_cycle"])
def test_incremental_routed_decoding_equals_a_masked_full_forward(kv_mode, sharing):
    loops = 3 if sharing == "cycle" else 2
    rec = recursify(tiny_llama(layers=8 if sharing == "middle_cycle" else 6), num_loops=loops,
                    sharing=sharing, lora_rank=4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (1, 20), generator=g)
    prompt = 5
    depths = torch.randint(1, loops + 1, (1, 20), generator=g)
    depths[0, :prompt - 1] = loops  # the prompt (minus its last token) is prefilled at full depth
    ref = routed_forward(rec, ids, depths, kv_mode)[0]
    dec = AdaptiveDecoder(rec, Scheduled(depths[0, prompt - 1:].tolist()), kv_mode=kv_mode)
    dec.prefill(ids[0, : prompt - 1].tolist())
    for t in range(prompt - 1, 20):
        result = dec.step(int(ids[0, t]))
        assert result.depth == int(depths[0, t])
        torch.testing.assert_close(result.logits, ref[t], atol=1e-4, rtol=1e-4)
    held, full = dec.kv_entries()
    assert held < full  # tokens that stopped early hold no KV in deeper loops (and share stores none)


def test_routers_save_load_and_keep_weights_tied(tmp_path):
    mor = add_routers(recursify(tiny_llama(), num_loops=3, lora_rank=4), "expert")
    mor.save_pretrained(tmp_path)
    again = RecursiveForCausalLM.from_pretrained(tmp_path)
    assert again.config.router_type == "expert" and again.config.router_capacity == pytest.approx([1, 2 / 3, 1 / 3])
    torch.testing.assert_close(again.routers.routers[1].weight, mor.routers.routers[1].weight)
    q = lambda m, p: m.model.layers[p].self_attn.q_proj.weight.data_ptr()
    assert q(again, 0) == q(again, 2) == q(again, 4)


def test_aux_loss_teaches_the_causal_decode_rule():
    mor = add_routers(recursify(tiny_llama(), num_loops=3, lora_rank=4), "expert")
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(mor.routers.parameters(), lr=0.05)
    first = expert_choice_forward(mor, ids, mor.config.router_capacity, aux_coeff=1.0)
    for _ in range(200):
        out = expert_choice_forward(mor, ids, mor.config.router_capacity, aux_coeff=1.0)
        opt.zero_grad()
        out.aux_loss.backward()
        opt.step()
    assert out.stats["sampling_accuracy"] >= 0.9 and out.stats["sampling_accuracy"] > first.stats["sampling_accuracy"] + 0.15
    assert out.stats["tokens_per_depth"] == [24 * 4 - 16 * 4, 16 * 4 - 8 * 4, 8 * 4]  # capacity 1, 2/3, 1/3
    assert out.stats["dead_token_ratio"] == 0.0


def test_expert_choice_forward_at_full_capacity_is_the_plain_model():
    rec = recursify(tiny_llama(), num_loops=2, sharing="middle_cycle", lora_rank=4)
    mor = add_routers(rec, "expert", capacity=[1.0, 1.0])
    ids = torch.randint(0, 256, (2, 10))
    torch.testing.assert_close(expert_choice_forward(mor, ids, [1.0, 1.0]).logits, rec(ids).logits)


def test_token_choice_balancing_loss_and_depths():
    mor = add_routers(recursify(tiny_llama(), num_loops=3, lora_rank=4), "token")
    ids = torch.randint(0, 256, (2, 16))
    out = token_choice_forward(mor, ids)
    assert sum(out.stats["tokens_per_depth"]) == 32 and out.aux_loss > 0
    out.aux_loss.backward()
    assert mor.token_router.proj.weight.grad is not None
    warm = token_choice_forward(mor, ids, warmup=True)
    torch.testing.assert_close(warm.logits, mor(ids).logits)  # warm-up routes every token to full depth


def test_token_choice_z_loss_counts_every_sample():
    """The z-loss is the mean of logsumexp² over the router logits of every token of every sample
    (it once kept only the batch's last sample)."""
    mor = add_routers(recursify(tiny_llama(), num_loops=3, lora_rank=4), "token").eval()
    ids = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = token_choice_forward(mor, ids, balance_coeff=0.0, z_coeff=1.0)
        inner = mor.model
        per_sample = []
        for b in range(3):
            h = inner.embed_tokens(ids[b:b + 1])
            h = inner.run_positions(h, mor.config.prelude_positions, inner.rope(h, torch.arange(8)[None]))
            per_sample.append(torch.logsumexp(mor.token_router.logits(h[0]).float(), -1).pow(2))
    expected = torch.cat(per_sample).mean()
    assert not torch.allclose(per_sample[-1].mean(), expected)  # the samples differ, so the bug would show
    torch.testing.assert_close(out.aux_loss, expected)


def test_the_share_mask_is_built_on_the_tokens_device():
    """``routed_forward(kv_mode="share")`` once built its mask on the CPU whatever the device (fails on
    CUDA); the mask now follows the tokens' device. Checked on the meta device, which any CPU has."""
    for device in ("cpu", "meta"):
        positions = torch.arange(5, device=device)
        mask = share_mask(positions, torch.tensor([1, 3], device=device), torch.float32)
        assert mask.device.type == device and mask.shape == (2, 5)
    mask = share_mask(torch.arange(5), torch.tensor([1, 3]), torch.float32)
    assert (mask[0, :2] == 0).all() and (mask[0, 2:] < -1e30).all() and (mask[1, :4] == 0).all()


@pytest.mark.parametrize("router_type", ["expert", "token"])
def test_router_policy_decisions_match_the_recorded_scores(router_type):
    mor = add_routers(recursify(tiny_llama(), num_loops=3, lora_rank=4), router_type)
    with torch.no_grad():  # make routing decisions non-trivial
        if router_type == "expert":
            for r in mor.routers.routers:
                r.weight.normal_(std=0.5)
        else:
            mor.token_router.proj.weight.normal_(std=0.5)
    ids = torch.randint(0, 256, (14,)).tolist()
    dec = AdaptiveDecoder(mor, Router(), kv_mode="recursion")
    dec.prefill(ids[:4])
    results = [dec.step(t) for t in ids[4:]]
    assert len({r.depth for r in results}) > 1
    for r in results:
        assert all(l.max_prob is None for l in r.loops)  # no LM head for the decision
        for l in r.loops[:-1]:  # every loop the token continued after
            if router_type == "expert":
                assert torch.sigmoid(torch.tensor(l.extra["router_logit"])) >= 0.5
        last = r.loops[-1]
        if router_type == "expert" and r.depth < 3:
            assert torch.sigmoid(torch.tensor(last.extra["router_logit"])) < 0.5
        if router_type == "token":
            assert last.extra["planned_depth"] == r.depth
    with pytest.raises(EngineInputError, match="router"):
        AdaptiveDecoder(recursify(tiny_llama(), num_loops=2), Router())


@pytest.mark.parametrize("router_type", ["expert", "token"])
def test_router_sweep_replays_the_engine_decisions(router_type):
    from model.evaluation.sweep import replay, score_ids, sweep

    mor = add_routers(recursify(tiny_llama(), num_loops=3, lora_rank=4), router_type)
    with torch.no_grad():
        for p in mor.parameters():
            if p.ndim == 2 and p.shape[0] <= 3 and p.shape[1] == 64:
                p.normal_(std=0.5)
    ids = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(3)).tolist()
    scores = score_ids(mor, ids)
    dec = AdaptiveDecoder(mor, Router(), kv_mode="sync")  # sync = the replay's full-KV semantics
    dec.prefill(ids[:1])
    engine_depths = [dec.step(t).depth for t in ids[1:-1]]
    assert replay(scores, Router())[1:] == engine_depths
    points = sweep(scores, "router")
    assert points[0].avg_depth <= points[-1].avg_depth  # a larger bias keeps more tokens going
