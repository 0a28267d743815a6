"""FREE's adaptive threshold: the Beta mixture fit, its online use in sync decoding, and the held-out
comparison's replay of it (``model.evaluation.free_threshold``)."""
from __future__ import annotations

import pytest
import torch

from model import generate
from model import recursify
from model.evaluation.free_threshold import (
    at_equal_compute, compare, frontier, pooled, replay_adaptive, sync_calibration_pairs, tuned_threshold,
)
from model.evaluation.sweep import TextScores, evaluate_depths, replay, score_ids
from model.inference.decoder import AdaptiveDecoder
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


# --- the held-out comparison (model.evaluation.free_threshold) ------------------------------------------

TEXTS = ["It was the best of times, it was the worst of times, it was the age of wisdom.",
         "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
         "Once upon a time there lived a king who had three daughters and a small garden.",
         "Rain fell on the old town all night, and by morning the river had left its banks.",
         "She opened the letter slowly, read it twice, and then laughed out loud at the end."]


@pytest.fixture(scope="module")
def confident_tiny(smol_tokenizer):
    """A tiny 3-loop model (CYCLE: no coda, so teacher-forced signals are exactly sync decoding's) with an
    untied random head: exits are confident (loop max-prob about 0.5 on average) and the confidence does
    not simply fall with depth (a tied head is most confident at loop 1, near the input embedding), so
    tokens exit at every loop; loop-1/2 argmax agrees with the last loop's for 20-25 % of tokens."""
    rec = recursify(tiny_llama(vocab=len(smol_tokenizer)), num_loops=3, lora_rank=8)
    torch.manual_seed(0)
    rec.lm_head.weight = torch.nn.Parameter(torch.randn_like(rec.lm_head.weight) * 0.8)
    return rec


def test_replay_of_the_adaptive_policy_equals_the_engine_in_sync_mode(confident_tiny, smol_tokenizer):
    rec, prompt = confident_tiny, 3
    seqs = [smol_tokenizer(t).input_ids for t in TEXTS]
    engine = AdaptiveConfidence(initial=0.5, measure="max_prob", zeta=0.4)
    engine_depths = []
    for ids in seqs:  # one decoder per sequence, the policy shared: as the server runs requests
        dec = AdaptiveDecoder(rec, engine, kv_mode="sync")
        dec.prefill(ids[: prompt - 1])
        engine_depths.append([dec.step(t).depth for t in ids[prompt - 1:-1]])
    replayed = AdaptiveConfidence(initial=0.5, measure="max_prob", zeta=0.4)
    scores = [score_ids(rec, ids, first=prompt) for ids in seqs]
    runs = replay_adaptive(scores, replayed)
    assert [r["depths"] for r in runs] == engine_depths
    assert len({d for depths in engine_depths for d in depths}) == 3  # every exit point is used
    assert replayed.history == pytest.approx(engine.history) and len(set(engine.history)) > 1  # it refitted
    assert [r["threshold"] for r in runs] == pytest.approx(engine.history[-len(seqs):])
    assert replayed.pairs[1] == engine.pairs[1] and 0 < sum(engine.pairs[1]) < len(engine.pairs[1])
    assert replayed.pairs[0] == pytest.approx(engine.pairs[0], abs=1e-4)
    head = scores[0].flops_by_depth[0]["head"]
    assert sum(r["calibration_flops"] for r in runs) == pytest.approx(len(engine.pairs[0]) * head)


def test_pooled_points_equal_one_evaluation_of_the_concatenated_tokens(confident_tiny, smol_tokenizer):
    ids = smol_tokenizer(TEXTS[0] + " " + TEXTS[1]).input_ids[:33]
    a, b = score_ids(confident_tiny, ids[:17]), score_ids(confident_tiny, ids[16:])
    policy = Confidence(0.5)
    depths = [replay(a, policy), replay(b, policy)]
    merged = TextScores(**{**a.__dict__, **{k: getattr(a, k) + getattr(b, k) for k in
                                            ("token_ids", "max_prob", "argmax", "target_logprob")}})
    whole = evaluate_depths(merged, depths[0] + depths[1], policy, 0.5)
    point = pooled([a, b], depths, policy)
    assert point["agreement"] == pytest.approx(whole.agreement) and point["perplexity"] == pytest.approx(whole.perplexity)
    assert point["saved_pct"] == pytest.approx(whole.saved_pct) and point["tokens"] == 32
    extra = pooled([a, b], depths, policy, [1e6, 1e6])  # calibration FLOPs lower the savings
    assert extra["saved_pct"] == pytest.approx(100 * (1 - (whole.flops_per_token * 32 + 2e6) / (whole.flops_full * 32)))


def hand_scores() -> TextScores:
    """Six tokens, three loops; token t's exit argmax at loop r is 10 * t + r unless it equals the last loop's."""
    argmax = [[0, 0, 0], [11, 12, 99], [20, 21, 21], [30, 32, 33], [40, 40, 40], [50, 50, 50]]
    conf = [[0.1 * t + 0.01 * r for r in range(1, 4)] for t in range(6)]
    return TextScores(token_ids=list(range(6)), max_prob=conf, top2_gap=conf, certainty=conf, cosine=conf,
                      halting=None, router=None, planned=None, argmax=argmax, target_logprob=[[-1.0] * 3] * 6,
                      flops_by_depth=[{"head": 7.0}] * 3, flops_full=1.0, num_loops=3)


def test_sync_calibration_labels_exited_tokens_once_a_later_token_carries_them_to_the_last_loop():
    scores = hand_scores()
    # t0 exits at 1 and waits; t1 runs loop 2 (t0 -> 2) and exits at 2; t2 exits at 1; t3 runs loop 2
    # (t2 -> 2) and loop 3 (t0, t1, t2 -> 3: labelled); t4 and t5 exit and wait until the sequence ends.
    pairs, caught_up = sync_calibration_pairs(scores, [1, 2, 1, 3, 1, 1], "max_prob")
    assert caught_up == 3
    assert pairs == [(pytest.approx(0.01), True), (pytest.approx(0.12), False), (pytest.approx(0.21), False)]
    with_trigger, caught_up = sync_calibration_pairs(scores, [1, 2, 1, 3, 1, 1], "max_prob", trigger=True)
    assert caught_up == 3  # t3's own loops 1 and 2 are labelled too, at no extra head
    assert with_trigger == pairs + [(pytest.approx(0.31), False), (pytest.approx(0.32), False)]
    assert sync_calibration_pairs(scores, [3] * 6, "max_prob") == ([], 0)


def test_fixed_thresholds_at_equal_compute_interpolate_neighbours_on_the_frontier():
    def pt(th, saved, agreement, ppl):
        return {"threshold": th, "saved_pct": saved, "agreement": agreement, "perplexity": ppl, "avg_depth": 2 - saved / 25}

    curve = [pt(0.9, -5, 1.0, 10), pt(0.7, 5, 0.9, 12), pt(0.65, 10, 0.78, 15), pt(0.6, 8, 0.7, 20),
             pt(0.55, 10, 0.6, 25), pt(0.5, 15, 0.7, 20), pt(0.0, 25, 0.3, 100)]
    assert [p["threshold"] for p in frontier(curve)] == [0.9, 0.7, 0.65, 0.5, 0.0]  # 0.6 and 0.55 are dominated
    at = at_equal_compute(curve, 12.5)
    assert at["interpolated"]["between"] == [0.65, 0.5] and at["interpolated"]["weight"] == pytest.approx(0.5)
    assert at["interpolated"]["agreement"] == pytest.approx(0.74)
    assert at["interpolated"]["perplexity"] == pytest.approx((15 * 20) ** 0.5)  # log-linear
    assert at["best_grid"]["threshold"] == 0.5  # the best single threshold saving >= 12.5 %
    assert at_equal_compute(curve, 10)["interpolated"]["agreement"] == pytest.approx(0.78)  # on a grid point
    assert at_equal_compute(curve, 10)["best_grid"]["threshold"] == 0.65
    assert at_equal_compute(curve, -10)["interpolated"]["threshold"] == 0.9  # everything saves more
    assert at_equal_compute(curve, 30) == {"interpolated": None, "best_grid": None}
    assert tuned_threshold(curve, 10)["threshold"] == 0.65 and tuned_threshold(curve, 30)["threshold"] == 0.0


def test_compare_pools_per_set_adaptive_runs_against_one_fixed_curve(confident_tiny, smol_tokenizer):
    scores = [score_ids(confident_tiny, smol_tokenizer(t).input_ids, first=3) for t in TEXTS]
    out = compare({"a": scores[:2], "b": scores[2:]}, zetas=(0.4,), initials=(0.5,), triggers=(False, True),
                  thresholds=[0.0, 0.5, 1.0])
    assert set(out["groups"]) == {"a", "b", "all"} and out["groups"]["all"]["tune_sequences"] == 1 + 1
    assert out["groups"]["all"]["curve"][-1]["agreement"] == 1.0  # threshold 1: every token at full depth
    plain, trig = out["variants"]["initial 0.5"]["groups"], out["variants"]["initial 0.5, +trigger pairs"]["groups"]
    for groups in (plain, trig):
        rows = {g: groups[g]["0.4"] for g in groups}
        assert rows["all"]["adaptive"]["pairs"] == rows["a"]["adaptive"]["pairs"] + rows["b"]["adaptive"]["pairs"]
        assert rows["all"]["adaptive"]["tokens"] == sum(len(s.token_ids) for s in scores)
        split = rows["all"]["split"]
        assert split["adaptive"]["tokens"] + sum(len(s.token_ids) for s in (scores[0], scores[2])) == \
            rows["all"]["adaptive"]["tokens"]  # the test halves: the second sequence of a, the last two of b
    assert trig["all"]["0.4"]["adaptive"]["pairs"] >= plain["all"]["0.4"]["adaptive"]["pairs"]
