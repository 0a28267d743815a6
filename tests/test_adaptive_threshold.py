"""FREE's adaptive threshold: the Beta mixture fit and its online use in sync decoding."""
from __future__ import annotations

import pytest
import torch

from model import generate
from model import recursify
from model.inference.policies import AdaptiveConfidence, BetaMixture, Confidence
from tests.conftest import tiny_llama


def test_beta_mixture_recovers_components_and_places_the_threshold():
    g = torch.Generator().manual_seed(0)
    cons = torch.distributions.Beta(8.0, 2.0).sample((4000,))
    incons = torch.distributions.Beta(2.0, 5.0).sample((4000,))
    bmm = BetaMixture(zeta=0.4)
    assert bmm.fit(cons.tolist() + incons.tolist(), [True] * 4000 + [False] * 4000)
    assert bmm.mean(True) == pytest.approx(0.8, abs=0.02) and bmm.mean(False) == pytest.approx(2 / 7, abs=0.02)
    lam = bmm.threshold()
    grid = bmm.grid
    post = bmm.pdf(grid, True) / (bmm.pdf(grid, True) + bmm.pdf(grid, False))
    assert 0.3 <= lam <= 0.9
    assert all(p > 0.4 for x, p in zip(grid, post) if x >= lam)  # the region above λ is "consistent"
    assert float(post[(grid < lam)].max()) <= 0.4 if (grid < lam).any() else True


def test_adaptive_policy_calibrates_from_sync_catch_up_and_records_its_estimate(smol_tokenizer):
    rec = recursify(tiny_llama(vocab=len(smol_tokenizer)), num_loops=3, lora_rank=4)
    probe = generate(rec, smol_tokenizer, "Hello there", policy=Confidence(1.0), max_new_tokens=12,
                     temperature=1.0, seed=0)
    first_loop = sorted(s.loops[0].max_prob for s in probe.steps)
    initial = first_loop[len(first_loop) // 2]  # about half the tokens exit after loop 1 at first
    policy = AdaptiveConfidence(initial=initial, measure="max_prob")
    prompts = ["Hello there", "Tell me a story", "What is two plus two?", "Name a colour"]
    traces = [generate(rec, smol_tokenizer, p, policy=policy, max_new_tokens=12, kv_mode="sync",
                       temperature=1.0, seed=i) for i, p in enumerate(prompts)]
    assert len(policy.pairs[0]) > 0  # caught-up tokens produced labelled pairs
    assert traces[0].settings["policy"] == "adaptive"
    assert all(s.threshold == traces[-1].steps[0].threshold for s in traces[-1].steps)
    assert policy.history[0] == initial


def test_the_threshold_lab_view_is_plain_data_of_the_fitted_mixture():
    import json

    torch.manual_seed(1)
    policy = AdaptiveConfidence(initial=0.9, measure="max_prob")
    for c in torch.distributions.Beta(8.0, 2.0).sample((200,)).tolist():
        policy.calibrate(c, True)
    for c in torch.distributions.Beta(2.0, 5.0).sample((200,)).tolist():
        policy.calibrate(c, False)
    assert policy.calibration_view()["fitted"] is False  # not refitted yet: no sequence has started
    policy.begin_sequence()
    view = json.loads(json.dumps(policy.calibration_view()))  # JSON-serialisable
    assert view["fitted"] and len(view["consistent"]) == len(view["inconsistent"]) == 200
    assert view["threshold"] == policy.threshold == view["history"][-1]
    posterior = dict(zip(view["grid"], view["posterior"]))
    above = [x for x, p in posterior.items() if p > view["zeta"]]
    assert min(above) <= view["threshold"] + 0.07  # the threshold sits where the posterior passes zeta
    assert view["pdf_consistent"][-5] > view["pdf_inconsistent"][-5]  # high confidence: mostly consistent
