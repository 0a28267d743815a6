"""Chat evaluation on ``heldout-chat-answers`` (issue 13): does a model answer like its teacher?

    python benchmarks/chat_eval.py --models teacher default --json .cache/eval/chat-before.json
    python benchmarks/chat_eval.py --models tuned=.cache/runs/chat-ft --json .cache/eval/chat-after.json
    python benchmarks/chat_eval.py --from-json .cache/eval/chat-before.json .cache/eval/chat-after.json \\
        --report docs/RESULTS.md
    python benchmarks/chat_eval.py --device cuda --batch-size 64 --models teacher default ...   # on a GPU

``--device cuda``: the models run there in fp32 (metrics as on the CPU); the policy sweeps replay on the CPU.

For every model spec (``model.evaluation.evaluate.load_entry``: ``teacher``, ``default``, a run or checkpoint folder):

1. Teacher-forced, every ``--forced-stride``-th held-out conversation (prompt + the teacher's stored greedy answer, one at a
   time, unpadded): per-loop PPL, KL(teacher || model) and top-1 agreement with the teacher, counted on
   the answer tokens (``model.evaluation.evaluate.evaluate_set``).
2. The model's own greedy answers (full depth, ``--new-tokens``) to every ``--stride``-th held-out prompt:
   the share whose first 16 answer tokens equal the teacher's stored answer (all of it, EOS included, if
   that is shorter), and the teacher's perplexity of these answers vs of its own stored answers (their
   first ``--new-tokens`` tokens), with the ratio.
3. Prose: per-loop PPL / KL / agreement on the first ``--prose-tokens`` of each DATA.md held-out set, the
   geometric-mean PPL and its ratio to the teacher's; with ``--sweep-tokens`` also the early-exit policy
   sweeps (``model.evaluation.evaluate.sweeps``: fixed, confidence, saturation, halting) on those rows.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.evaluation import evaluate as E  # noqa: E402
from model.data import answer_store  # noqa: E402
from model.data.answer_prompts import HELDOUT_NAME  # noqa: E402
from model.training.on_policy import OnPolicySettings, sample_answers  # noqa: E402

log = logging.getLogger("chat_eval")

REPORT_START, REPORT_END = "<!-- chat-eval:start -->", "<!-- chat-eval:end -->"
MATCH_TOKENS = 16


def prefix_match(answer: list[int], reference: list[int], n: int = MATCH_TOKENS) -> bool:
    """Whether ``answer`` starts with the first ``n`` tokens of ``reference`` (all of it if shorter)."""
    head = reference[:n]
    return answer[: len(head)] == head


@torch.no_grad()
def greedy_answers(model, prompts: list[list[int]], new_tokens: int, eos_id: int, batch_size: int = 16) -> list[list[int]]:
    """Greedy answers at full depth, batched with left padding (``on_policy.sample_answers`` at temperature 0),
    prompts of similar length together, each cut after its first EOS."""
    settings = OnPolicySettings(share=0.0, max_new_tokens=new_tokens, temperature=0.0)
    answers: dict[int, list[int]] = {}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: less padding
    for start in range(0, len(order), batch_size):
        batch = order[start: start + batch_size]
        rows = sample_answers(model, [prompts[i] for i in batch], [None] * len(batch), eos_id, settings)
        answers.update(zip(batch, rows))
    return [answers[i] for i in range(len(prompts))]


def teacher_ppl(teacher, prompts: list[list[int]], answers: list[list[int]]) -> float:
    """The teacher's perplexity of ``answers`` (given their prompts), over all answer tokens."""
    entry = E.Entry("teacher", "teacher", teacher)
    seqs = [torch.tensor(p + a) for p, a in zip(prompts, answers)]
    return E.evaluate_set([entry], teacher, seqs, starts=[len(p) for p in prompts])["teacher"]["ppl"][0]


def evaluate_model(entry: E.Entry, teacher, tokenizer, heldout: list[answer_store.Answer], args) -> dict:
    """All metrics of the module docstring for one model."""
    tic = time.time()
    forced = heldout[:: args.forced_stride]
    chat = E.evaluate_set([entry], teacher, [torch.tensor(a.prompt_ids + a.answer_ids) for a in forced],
                          starts=[len(a.prompt_ids) for a in forced])[entry.label]
    chat["conversations"] = len(forced)
    log.info("%s: teacher-forced chat %s (%.0f s)", entry.label, chat, time.time() - tic)

    subset = heldout[:: args.stride]
    prompts = [a.prompt_ids for a in subset]
    tic = time.time()
    own = greedy_answers(entry.model, prompts, args.new_tokens, tokenizer.eos_token_id, getattr(args, "batch_size", 16))
    gen_seconds = time.time() - tic
    reference = [a.answer_ids[: args.new_tokens] for a in subset]
    own_ppl, ref_ppl = teacher_ppl(teacher, prompts, own), teacher_ppl(teacher, prompts, reference)
    greedy = {
        "prompts": len(subset), "new_tokens": args.new_tokens, "generation_seconds": round(gen_seconds, 1),
        "first16_match": sum(prefix_match(o, a.answer_ids, min(MATCH_TOKENS, args.new_tokens))
                             for o, a in zip(own, subset)) / len(subset),
        "teacher_ppl_own": own_ppl, "teacher_ppl_teacher": ref_ppl, "teacher_ppl_ratio": own_ppl / ref_ppl,
        "mean_answer_tokens": sum(map(len, own)) / len(own),
        "eos_share": sum(tokenizer.eos_token_id in o for o in own) / len(own),
        "samples": [{"prompt": tokenizer.decode(a.prompt_ids), "teacher": tokenizer.decode(a.answer_ids[: args.new_tokens]),
                     "model": tokenizer.decode(o)} for a, o in zip(subset, own)],
    }
    log.info("%s: greedy %s", entry.label, {k: v for k, v in greedy.items() if k != "samples"})

    from model.data import heldout_names, load_split

    rows_per_set = max(1, args.prose_tokens // args.seq_len)
    prose, pooled = {}, []
    teacher_entry = E.Entry("teacher", "teacher", teacher)
    for name in heldout_names():
        rows = load_split(name, args.seq_len)[:rows_per_set]
        both = E.evaluate_set([entry, teacher_entry] if entry.model is not teacher else [entry], teacher, rows)
        prose[name] = {"model": both[entry.label], "teacher": both.get("teacher", both[entry.label])}
        pooled.append(rows[: max(1, args.sweep_tokens // args.seq_len)])
    loops = len(next(iter(prose.values()))["model"]["ppl"])
    geo = [E.geo_mean([p["model"]["ppl"][r] for p in prose.values()]) for r in range(loops)]
    teacher_geo = E.geo_mean([p["teacher"]["ppl"][0] for p in prose.values()])
    result = {"spec": entry.spec, "params": entry.params, "chat_teacher_forced": chat, "greedy": greedy,
              "prose": prose, "prose_geo_ppl": geo, "teacher_prose_geo_ppl": teacher_geo,
              "prose_ppl_ratio": geo[-1] / teacher_geo,
              "training": getattr(entry.model.config, "training", None)}
    if args.sweep_tokens and hasattr(entry.model, "parameter_counts") and entry.model.config.num_loops > 1:
        result["sweeps"] = E.sweeps(entry.model.to("cpu"), torch.cat(pooled))  # replayed on the CPU
    return result


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    from model.io.checkpoint import load_model

    torch.set_num_threads(args.threads)
    started = time.time()
    device = torch.device(args.device)
    teacher, tokenizer = load_model(args.teacher)
    teacher.to(device)
    heldout = answer_store.load_answers(HELDOUT_NAME, modes=("greedy",))[: args.conversations]
    results = {"command": "python benchmarks/chat_eval.py " + " ".join(argv),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
               "threads": args.threads, "heldout_conversations": len(heldout),
               "answer_tokens": sum(len(a.answer_ids) for a in heldout), "models": {}}
    for spec in args.models:
        entry = E.load_entry(spec, teacher, args.teacher)
        entry.model.to(device)
        results["models"][entry.label] = evaluate_model(entry, teacher, tokenizer, heldout, args)
        del entry
    results["wall_seconds"] = time.time() - started
    return results


# --- report -----------------------------------------------------------------------------------------
def markdown(runs: list[dict]) -> str:
    """One table over every model of every result, the commands, and the halting sweeps."""
    lines = ["| model | chat agreement (loop 1 / full) | chat KL | chat PPL | first-16 match | "
             "teacher PPL of own answers (vs teacher's own) | ratio | prose geo PPL (loop 1 / full) | × teacher |",
             "|---|---|---|---|---|---|---|---|---|"]
    for res in runs:
        for label, m in res["models"].items():
            c, g = m["chat_teacher_forced"], m["greedy"]
            loop1 = f"{c['agreement'][0]:.3f} / " if len(c["agreement"]) > 1 else ""
            prose1 = f"{m['prose_geo_ppl'][0]:.0f} / " if len(m["prose_geo_ppl"]) > 1 else ""
            lines.append(f"| {label} | {loop1}**{c['agreement'][-1]:.3f}** | {c['kl'][-1]:.3f} | {c['ppl'][-1]:.2f} | "
                         f"**{g['first16_match']:.3f}** ({round(g['first16_match'] * g['prompts'])}/{g['prompts']}) | "
                         f"{g['teacher_ppl_own']:.2f} ({g['teacher_ppl_teacher']:.2f}) | **{g['teacher_ppl_ratio']:.2f}** | "
                         f"{prose1}{m['prose_geo_ppl'][-1]:.1f} | **{m['prose_ppl_ratio']:.2f}** |")
    first = runs[0]
    forced = next(iter(first["models"].values()))["chat_teacher_forced"]
    lines += ["", f"Teacher-forced: {forced['conversations']} of the {first['heldout_conversations']} held-out "
              f"conversations ({forced['tokens']} answer tokens); greedy answers to "
              f"{next(iter(first['models'].values()))['greedy']['prompts']} of their prompts; commands:", ""]
    lines += [f"    {res['command']}   # {res['wall_seconds']:.0f} s, {res['threads']} thread(s)" for res in runs]
    sweeps = [(label, m["sweeps"]["halting"]) for res in runs for label, m in res["models"].items()
              if "halting" in m.get("sweeps", {})]
    if sweeps:
        lines += ["", "Halting heads (teacher-forced replay on the prose rows, `model.evaluate.sweeps`): "
                  "threshold → avg loops / agreement with full depth / FLOPs saved %.", "",
                  "| model | " + " | ".join(f"halting {p['threshold']:.2g}" for p in sweeps[0][1][::2]) + " |",
                  "|---|" + "---|" * len(sweeps[0][1][::2])]
        for label, points in sweeps:
            lines.append(f"| {label} | " + " | ".join(f"{p['avg_depth']:.2f} / {p['agreement']:.3f} / {p['saved_pct']:.1f}"
                                                     for p in points[::2]) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python benchmarks/chat_eval.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=[], help="model specs ([label=]spec, model.evaluate)")
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--conversations", type=int, default=None, help="first N held-out conversations (smoke tests)")
    parser.add_argument("--forced-stride", type=int, default=1,
                        help="teacher-forced metrics on every N-th held-out conversation")
    parser.add_argument("--stride", type=int, default=4, help="greedy answers to every N-th held-out prompt")
    parser.add_argument("--new-tokens", type=int, default=48, help="greedy answer length (and of the reference)")
    parser.add_argument("--prose-tokens", type=int, default=2048, help="tokens per DATA.md held-out set")
    parser.add_argument("--sweep-tokens", type=int, default=512, help="tokens per set for the policy sweeps (0: none)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the policy sweeps replay on the CPU)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batch of greedy answers")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--from-json", type=Path, nargs="*", default=None, help="render saved results (no model runs)")
    parser.add_argument("--report", type=Path, default=None, help="markdown file whose chat-eval block is replaced")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.from_json:
        runs = [json.loads(path.read_text()) for path in args.from_json]
    elif args.models:
        runs = [run(args, argv)]
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(runs[0], indent=1, default=str))
    else:
        build_parser().error("give --models ... or --from-json ...")
    text = markdown(runs)
    print(text)
    if args.report:
        E.write_report(args.report, text, REPORT_START, REPORT_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
