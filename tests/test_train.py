"""Training on tiny random models: KD steps help, resume is exact, halting heads learn, exits run."""
from __future__ import annotations

import json
import math

import pytest
import torch

import model.data
from model.training import objectives, run_state
from model.training import rows as training_rows
from model.training import train as T
from model.io.checkpoint import load_model, load_tokenizer
from tests.conftest import tiny_llama

SEQ, ROWS = 16, 64


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    """A tiny teacher folder and synthetic train/val splits patched into model.data."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    teacher = tiny_llama(layers=6)
    base = tmp_path / "teacher"
    teacher.save_pretrained(base)
    load_tokenizer("smollm2-135m").save_pretrained(base)
    g = torch.Generator().manual_seed(0)
    # learnable structure: each row repeats a short random pattern
    patterns = torch.randint(3, 256, (ROWS, 4), generator=g)
    rows = patterns.repeat(1, SEQ // 4)
    splits = {"train": rows, "val": rows[:4]}

    def iter_batches(name, batch_size, seq_len=SEQ, seed=0, start_row=0, shuffle=True, drop_last=False):
        data = splits[name]
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)) if shuffle \
            else torch.arange(len(data))
        for start in range(start_row, len(order), batch_size):
            index = order[start:start + batch_size]
            if drop_last and len(index) < batch_size:
                return
            yield data[index]

    monkeypatch.setattr(model.data, "iter_batches", iter_batches)
    monkeypatch.setattr(model.data, "load_split", lambda name, seq_len=SEQ: splits[name])
    return tmp_path, base


def uptrain_args(base, out, steps=4, extra=()):
    argv = ["uptrain", "--base", str(base), "--loops", "2", "--sharing", "cycle", "--init", "average",
            "--lora-rank", "4", "--lora-init", "svd", "--tokens", str(steps * 2 * 2 * SEQ), "--seq-len", str(SEQ),
            "--batch-size", "2", "--grad-accum", "2", "--lr", "3e-3", "--warmup", "1", "--eval-every", "0",
            "--save-every", "2", "--val-rows", "2", "--out", str(out), *extra]
    args = T.build_parser().parse_args(argv)
    args.argv = argv
    return args


def test_parse_tokens():
    assert run_state.parse_tokens("300k") == 300_000 and run_state.parse_tokens("1M") == 1_000_000 and run_state.parse_tokens("512") == 512
    assert run_state.parse_tokens("1.5m") == 1_500_000


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise():
    a = torch.randn(2, 5, 11)
    for kind in ("forward_kl", "reverse_kl"):
        assert float(objectives.kd_loss(a, a, 2.0, kind)) == pytest.approx(0.0, abs=1e-6)
        assert float(objectives.kd_loss(a, torch.randn(2, 5, 11), 1.0, kind)) > 0


def test_optimizer_steps_reduce_kd_loss(tiny_run):
    tmp, base = tiny_run
    out = tmp / "run"
    T.train(uptrain_args(base, out, steps=8, extra=["--train", "all"]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_kd = [r["kd"] for r in records if r["kind"] == "train"]
    assert len(train_kd) == 8
    assert sum(train_kd[-3:]) / 3 < 0.8 * sum(train_kd[:3]) / 3
    rec = load_model(out / "checkpoint")[0]
    stage = rec.config.training["stages"][-1]
    assert stage["stage"] == "uptrain" and stage["complete"] and stage["tokens_seen"] == 8 * 4 * SEQ
    assert stage["val"]["ppl"] and "model.training uptrain" in stage["command"]


def assert_resume_matches_straight_run(tmp, base, monkeypatch, extra=()):
    """Run once straight and once killed after the step-2 checkpoint then rerun; both must end equal."""
    T.train(uptrain_args(base, tmp / "straight", extra=extra))

    real_save = run_state.save_run_checkpoint

    def save_then_die(out, model, tok, opt, sched, progress):
        real_save(out, model, tok, opt, sched, progress)
        if progress.step == 2:
            raise KeyboardInterrupt("simulated kill right after the step-2 checkpoint")

    monkeypatch.setattr(T, "save_run_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        T.train(uptrain_args(base, tmp / "resumed", extra=extra))
    assert run_state.load_trainer_state(tmp / "resumed")["progress"]["step"] == 2
    monkeypatch.setattr(T, "save_run_checkpoint", real_save)
    T.train(uptrain_args(base, tmp / "resumed", extra=extra))  # the same command again: continues from step 2

    a, b = run_state.load_trainer_state(tmp / "straight"), run_state.load_trainer_state(tmp / "resumed")
    for key in ("step", "tokens_seen", "epoch", "row", "answer_epoch", "answer_row", "answer_rows_seen",
                "on_policy_epoch", "on_policy_prompt", "on_policy_rows_seen", "on_policy_tokens_sampled"):
        assert a["progress"][key] == b["progress"][key], key
    assert a["scheduler"] == b["scheduler"]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.allclose(sa["exp_avg"], sb["exp_avg"], atol=1e-6)
        assert torch.allclose(sa["exp_avg_sq"], sb["exp_avg_sq"], atol=1e-8)
    ma, mb = load_model(tmp / "straight" / "checkpoint")[0], load_model(tmp / "resumed" / "checkpoint")[0]
    for (na, pa), (nb, pb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert na == nb and torch.allclose(pa, pb, atol=1e-6), na
    return a


def test_resume_after_interruption_matches_uninterrupted_run(tiny_run, monkeypatch):
    tmp, base = tiny_run
    assert_resume_matches_straight_run(tmp, base, monkeypatch)


def test_exits_trains_halting_heads_from_an_uptrained_run(tiny_run):
    tmp, base = tiny_run
    T.train(uptrain_args(base, tmp / "up", steps=2))
    argv = ["exits", "--from", str(tmp / "up"), "--base", str(base), "--tokens", str(2 * 2 * 2 * SEQ),
            "--seq-len", str(SEQ), "--batch-size", "2", "--grad-accum", "2", "--halting-hidden", "8",
            "--eval-every", "0", "--save-every", "2", "--val-rows", "2", "--out", str(tmp / "ee")]
    args = T.build_parser().parse_args(argv)
    args.argv = argv
    T.train(args)
    rec = load_model(tmp / "ee" / "checkpoint")[0]
    assert rec.has_halting_heads and rec.config.halting_hidden == 8
    assert [s["stage"] for s in rec.config.training["stages"]] == ["uptrain", "exits"]
    records = [json.loads(line) for line in (tmp / "ee" / "metrics.jsonl").read_text().splitlines()]
    assert all("bce_loop1" in r for r in records if r["kind"] == "train")


def test_halting_head_learns_a_separable_toy_case():
    from model.definition.modeling import HaltingHead

    torch.manual_seed(0)
    head = HaltingHead(16, 8)
    x = torch.randn(512, 16)
    target = (x[:, 0] + 0.5 * x[:, 1] > 0).float()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    accuracy = float(((head(x) > 0).float() == target).float().mean())
    assert accuracy > 0.95


def test_fit_to_time_and_the_schedule_it_reshapes():
    # 10 steps took 5 s; 20 s left -> 40 more steps, never beyond the planned total, always one more step
    assert run_state.fit_to_time(step=10, total_steps=1000, steps_timed=10, seconds_timed=5.0, seconds_left=20.0) == 50
    assert run_state.fit_to_time(10, 30, 10, 5.0, 20.0) == 30
    assert run_state.fit_to_time(10, 1000, 10, 5.0, -3.0) == 11
    schedule = run_state.CosineWithWarmup(total_steps=100, warmup_steps=10)
    assert schedule(0) == pytest.approx(0.1) and schedule(10) == pytest.approx(1.0)
    assert schedule(100) == pytest.approx(0.1)
    schedule.total_steps = 50  # a time budget shortens the run: the decay ends earlier
    assert schedule(50) == pytest.approx(0.1) and schedule(30) < run_state.CosineWithWarmup(100, 10)(30)


def test_max_seconds_ends_the_run_decayed_and_complete(tiny_run, monkeypatch):
    tmp, base = tiny_run
    clock = {"now": 1000.0}

    def fake_time():  # each call advances 1 s: a step costs a few seconds of this clock
        clock["now"] += 1.0
        return clock["now"]

    monkeypatch.setattr(T.time, "time", fake_time)
    args = uptrain_args(base, tmp / "timed", steps=200, extra=["--max-seconds", "60", "--budget-probe", "2",
                                                               "--budget-reserve", "4"])
    T.train(args)
    state = run_state.load_trainer_state(tmp / "timed")
    steps = state["progress"]["step"]
    assert 3 < steps < 200  # cut by the budget, not by --tokens
    rec = load_model(tmp / "timed" / "checkpoint")[0]
    stage = rec.config.training["stages"][-1]
    assert stage["complete"] and stage["steps"] == steps
    lrs = [json.loads(line)["lr"] for line in (tmp / "timed" / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["kind"] == "train"]
    assert lrs[-1] == pytest.approx(0.1 * 3e-3, rel=0.2)  # the cosine reached its floor at the fitted end


def test_uptrain_with_exits_cotrains_halting_heads(tiny_run):
    tmp, base = tiny_run
    T.train(uptrain_args(base, tmp / "co", steps=2, extra=["--with-exits", "--halting-hidden", "8"]))
    rec = load_model(tmp / "co" / "checkpoint")[0]
    assert rec.has_halting_heads and rec.config.halting_hidden == 8
    records = [json.loads(line) for line in (tmp / "co" / "metrics.jsonl").read_text().splitlines()]
    assert all("bce_loop1" in r and "ce_loop1" in r for r in records if r["kind"] == "train")


ANSWER_MARK = 1  # first token of every synthetic teacher-answer row (prose rows start at >= 3)


@pytest.fixture
def answer_rows(monkeypatch):
    """Synthetic teacher-answer rows patched into model.data.answer_store.packed_rows (train split only)."""
    import model.data.answer_store

    rows = torch.randint(3, 256, (10, SEQ), generator=torch.Generator().manual_seed(5))
    rows[:, 0] = ANSWER_MARK
    calls = []

    def packed_rows(split="train", seq_len=SEQ, seed=0, **_):
        assert split == "train" and seq_len == SEQ
        calls.append(seed)
        return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]

    monkeypatch.setattr(model.data.answer_store, "packed_rows", packed_rows)
    return calls


def test_answer_row_spreads_exactly_the_share():
    for share in (0.0, 0.25, 0.5, 0.6, 0.7, 1.0):
        for n in (1, 7, 10, 33, 100):
            assert sum(training_rows.answer_row(i, share) for i in range(n)) == int(n * share + 1e-9), (share, n)
    assert [training_rows.answer_row(i, 0.5) for i in range(4)] == [False, True, False, True]


def test_answers_share_mixes_rows_and_resumes(tiny_run, answer_rows, monkeypatch):
    tmp, base = tiny_run
    args = uptrain_args(base, tmp / "probe", extra=["--answers-share", "0.7"])
    progress = run_state.Progress()
    batches = training_rows.training_batches(model.data.iter_batches, args, progress, world=1, rank=0)
    rows = torch.cat([next(batches)[0] for _ in range(15)])  # 30 rows: 21 answers (two passes over 10), 9 prose
    assert int((rows[:, 0] == ANSWER_MARK).sum()) == 21 and progress.answer_rows_seen == 21
    assert (progress.answer_epoch, progress.answer_row, progress.row) == (2, 1, 9) and answer_rows == [0, 1, 2]

    state = assert_resume_matches_straight_run(tmp, base, monkeypatch, extra=["--answers-share", "0.7"])
    assert state["progress"]["answer_rows_seen"] == int(16 * 0.7)  # 4 steps x 2 x 2 rows
    data = load_model(tmp / "resumed" / "checkpoint")[0].config.training["stages"][-1]["data"]
    assert data["answers_share"] == 0.7 and data["answer_rows_consumed"] == 11 and data["rows_consumed"] == 5
    assert data["tokens_from_answers"] == 11 * SEQ and data["tokens_from_prose"] == 5 * SEQ


def test_uptrain_from_a_trained_model_appends_a_stage(tiny_run, answer_rows):
    tmp, base = tiny_run
    T.train(uptrain_args(base, tmp / "up", steps=2, extra=["--with-exits", "--halting-hidden", "8"]))
    T.train(uptrain_args(base, tmp / "ft", steps=2, extra=["--from", str(tmp / "up"), "--with-exits",
                                                           "--halting-hidden", "8", "--answers-share", "0.5"]))
    up, ft = load_model(tmp / "up" / "checkpoint")[0], load_model(tmp / "ft" / "checkpoint")[0]
    stages = ft.config.training["stages"]
    assert [s["stage"] for s in stages] == ["uptrain", "uptrain"] and stages[0] == up.config.training["stages"][0]
    assert stages[1]["data"]["answers_share"] == 0.5 and ft.config.training["tokens_seen"] == 2 * 2 * 4 * SEQ
    assert ft.has_halting_heads

    def val_ppl(run):
        return [json.loads(line)["ppl"] for line in (tmp / run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "val"]

    assert val_ppl("ft")[0] == pytest.approx(val_ppl("up")[-1], rel=1e-5)  # it started from the trained model


# --- on-policy distillation (model/training/on_policy.py) ---------------------------------------------
ON_POLICY = ["--answers-share", "0.5", "--on-policy-share", "0.5", "--on-policy-tokens", "4", "--with-exits",
             "--halting-hidden", "8"]


@pytest.fixture
def chat_prompts(monkeypatch):
    """Synthetic train answers patched into model.data.answer_store.load_answers: 12 distinct prompts of 2-6
    tokens (each twice: a greedy and a sampled answer), ids >= 3 (EOS is 2)."""
    import model.data.answer_store as store

    g = torch.Generator().manual_seed(11)
    answers = []
    for i in range(12):
        prompt = torch.randint(3, 256, (2 + i % 5,), generator=g).tolist()
        for mode in ("greedy", "sampled"):
            answers.append(store.Answer(f"p{i}", "train", "k", "s", "d", mode, None, True, prompt, [5, 6, 2]))
    monkeypatch.setattr(store, "load_answers", lambda split="train", *a, **k: answers if split == "train" else [])
    return {tuple(a.prompt_ids) for a in answers}


def test_row_source_spreads_on_policy_rows_within_the_answer_rows():
    class Args:
        answers_share, on_policy_share = 0.6, 0.5

    sources = [training_rows.row_source(i, Args) for i in range(100)]
    assert sources.count("prose") == 40 and sources.count("on_policy") == 30 and sources.count("answer") == 30
    Args.on_policy_share = 0.0
    assert [training_rows.row_source(i, Args) for i in range(100)].count("answer") == 60


def test_masked_losses_equal_the_losses_on_the_real_positions_only():
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    pieces = [objectives.kd_loss(student[0:1], teacher[0:1]) * 6, objectives.kd_loss(student[1:, :3], teacher[1:, :3]) * 3]
    assert float(objectives.kd_loss(student, teacher, mask=mask)) == pytest.approx(float(sum(pieces) / 9), rel=1e-5)
    assert float(objectives.kd_loss(student, teacher, mask=torch.ones(2, 6, dtype=torch.bool))) == \
        pytest.approx(float(objectives.kd_loss(student, teacher)), rel=1e-6)
    ce = [objectives.next_token_ce(student[0:1], ids[0:1]) * 5, objectives.next_token_ce(student[1:, :3], ids[1:, :3]) * 2]
    assert float(objectives.next_token_ce(student, ids, mask)) == pytest.approx(float(sum(ce) / 7), rel=1e-5)


def test_sample_answers_batched_equals_one_at_a_time(tiny_run):
    from model.conversion.recursify import recursify
    from model.training.on_policy import OnPolicySettings, sample_answers

    rec = recursify(tiny_llama(layers=6), num_loops=2, sharing="cycle", lora_rank=4).eval()
    prompts = [[5, 9, 11], [7, 8, 9, 10, 11, 12, 13], [40, 41]]
    settings = OnPolicySettings(1.0, max_new_tokens=6, temperature=0.7, top_p=0.9)
    batched = sample_answers(rec, prompts, [1, 2, 3], 2, settings)
    alone = [sample_answers(rec, [p], [s], 2, settings)[0] for p, s in zip(prompts, [1, 2, 3])]
    assert batched == alone and all(1 <= len(a) <= 6 for a in batched)
    greedy = sample_answers(rec, prompts, [None] * 3, 2, settings)
    for prompt, answer in zip(prompts, greedy):  # greedy = the argmax of an unpadded full forward
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            top = rec(input_ids=ids).logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
        assert top[: len(answer)] == answer


def test_on_policy_rows_hold_student_conversations_and_are_deterministic(tiny_run, answer_rows, chat_prompts):
    from model.training.on_policy import OnPolicyRows

    tmp, base = tiny_run
    args = uptrain_args(base, tmp / "probe", extra=ON_POLICY)
    calls = []

    def sample(prompts, seeds):  # a stand-in student: 1-4 tokens of one value, EOS or not, by the seed only
        calls.append(len(prompts))
        return [[3 + s % 50] * (1 + s % 4) + ([2] if s % 2 else []) for s in seeds]

    def rows_of(progress):
        on_policy = OnPolicyRows(args, progress, sample, eos_id=2)
        batches = training_rows.training_batches(model.data.iter_batches, args, progress, 1, 0, on_policy)
        return [next(batches) for _ in range(8)]  # 4 steps x 2 micro-batches x 2 rows = 16 rows, 4 on-policy

    first, second = rows_of(run_state.Progress()), rows_of(run_state.Progress())
    assert all(torch.equal(a[0], b[0]) and (a[1] is None) == (b[1] is None) for a, b in zip(first, second))
    assert all(a[1] is None or torch.equal(a[1], b[1]) for a, b in zip(first, second))
    assert calls[:4] == calls[4:] and len(calls) == 8  # one generation call per optimizer step
    sources = [training_rows.row_source(i, args) for i in range(16)]
    on_policy = [(first[i // 2][0][i % 2], torch.ones(SEQ, dtype=torch.bool) if first[i // 2][1] is None
                  else first[i // 2][1][i % 2]) for i, s in enumerate(sources) if s == "on_policy"]
    assert len(on_policy) == 4
    for ids, mask in on_policy:
        length = int(mask.sum())
        assert mask[:length].all() and (ids[length:] == 2).all()  # padding: EOS at the end, masked
        real = ids[:length].tolist()
        # conversations back to back: a known prompt, the stand-in answer (one repeated token), EOS; the
        # last one may be cut by the row's end
        at, conversations = 0, 0
        while at < length:
            prompt = max((p for p in chat_prompts if tuple(real[at: at + len(p)]) == p[: length - at]), key=len)
            at += len(prompt)
            answer = real[at: real.index(2, at) if 2 in real[at:] else length]
            assert len(set(answer)) <= 1 and len(answer) <= 4
            at += len(answer) + 1
            conversations += 1
        assert conversations >= 1
    progress = run_state.Progress()
    rows_of(progress)
    assert progress.on_policy_rows_seen == 4 and progress.on_policy_conversations >= 4
    assert progress.answer_rows_seen == 4 and progress.row == 8
    assert progress.on_policy_padding == sum(SEQ - int(mask.sum()) for _, mask in on_policy)


def test_on_policy_run_resumes_exactly_and_records_provenance(tiny_run, answer_rows, chat_prompts, monkeypatch):
    tmp, base = tiny_run
    state = assert_resume_matches_straight_run(tmp, base, monkeypatch, extra=ON_POLICY)
    for key in ("on_policy_epoch", "on_policy_prompt", "on_policy_rows_seen", "on_policy_conversations",
                "on_policy_tokens_sampled", "on_policy_padding"):
        assert state["progress"][key] == run_state.load_trainer_state(tmp / "resumed")["progress"][key], key
    assert state["progress"]["on_policy_rows_seen"] == 4 and state["progress"]["on_policy_tokens_sampled"] > 0
    data = load_model(tmp / "resumed" / "checkpoint")[0].config.training["stages"][-1]["data"]
    assert data["on_policy_share"] == 0.5 and data["on_policy_rows_consumed"] == 4
    assert data["tokens_sampled_by_student"] == state["progress"]["on_policy_tokens_sampled"]
    assert data["answer_rows_consumed"] == 4 and data["rows_consumed"] == 8 and data["tokens_from_prose"] == 8 * SEQ


def test_on_policy_toy_run_loss_is_finite_and_falls(tiny_run, chat_prompts):
    tmp, base = tiny_run
    from model.conversion.recursify import recursify

    # a student converted from another random model, both with sharper logits than a fresh tiny Llama's
    # (near uniform): a KL worth learning (a fresh conversion of the teacher starts at ~0.01)
    teacher, other = tiny_llama(layers=6), tiny_llama(layers=6, seed=1)
    with torch.no_grad():
        teacher.model.embed_tokens.weight.mul_(3)
        other.model.embed_tokens.weight.mul_(3)
    teacher.save_pretrained(base)
    recursify(other, num_loops=2, sharing="cycle", init="average", lora_rank=4).save_pretrained(tmp / "student")
    load_tokenizer("smollm2-135m").save_pretrained(tmp / "student")
    out = tmp / "op"
    T.train(uptrain_args(base, out, steps=8, extra=["--from", str(tmp / "student"), "--train", "all", "--answers-share",
                                                     "1", "--on-policy-share", "1", "--on-policy-tokens", "6"]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in records if r["kind"] == "train"]
    assert len(kd) == 8 and all(math.isfinite(x) for x in kd)
    assert sum(kd[-3:]) / 3 < 0.8 * sum(kd[:3]) / 3
    last = [r for r in records if r["kind"] == "train"][-1]
    assert last["sampled_tokens"] > 0 and last["on_policy_s"] > 0
