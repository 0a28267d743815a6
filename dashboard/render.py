"""Traces -> what the page shows: coloured tokens, counters, token details, model card (HTML)."""
from __future__ import annotations

import html

from model.inference.decoder import KV_MODE_SAVINGS
from model.inference.trace import GenerationTrace, TokenStep

# Colour-blind-safe sequential palette (viridis stops, light text on dark steps handled by CSS).
DEPTH_COLOURS = ["#FDE725", "#7AD151", "#22A884", "#2A788E", "#414487", "#440154"]


def depth_label(depth: int) -> str:
    return f"{depth} loop" if depth == 1 else f"{depth} loops"


def colour_map(max_depth: int) -> dict[str, str]:
    """HighlightedText colour per depth label, shallow = light, deep = dark."""
    stops = depth_colours(max_depth)
    return {depth_label(d): stops[d - 1] for d in range(1, max_depth + 1)}


def depth_colours(n: int) -> list[str]:
    """One colour per depth 1..n, light (shallow) to dark (deep)."""
    if n <= 1:
        return [DEPTH_COLOURS[2]]
    idx = [round(i * (len(DEPTH_COLOURS) - 1) / (n - 1)) for i in range(n)]
    return [DEPTH_COLOURS[i] for i in idx]


def highlighted(trace: GenerationTrace | None) -> list[tuple[str, str]]:
    """(token text, depth label) pairs for ``gr.HighlightedText``."""
    if trace is None:
        return []
    return [(_visible(s.text), depth_label(s.depth)) for s in trace.steps]


def _visible(text: str) -> str:
    """Keep every token clickable and coloured: mark newlines (↵) and empty pieces (∅)."""
    if not text:
        return "∅"
    return text.replace("\n", "↵\n")


def _fmt_flops(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}FLOP"
    return f"{x:.0f} FLOP"


def counters(trace: GenerationTrace | None, speedup: float | None = None, running: bool = False) -> str:
    """The counter strip: average depth, savings, KV, speed."""
    if trace is None or not trace.steps:
        return "<div class='counters empty'>Run a prompt to see depth and compute counters.</div>"
    t = trace.totals()
    cells = [
        ("tokens", f"{t['tokens']}"),
        ("average depth", f"{t['avg_depth']:.2f} / {t['max_depth']}"),
        ("block FLOPs saved", f"{t['block_flops_saved_pct']:.1f}%"),
        ("total FLOPs saved", f"{t['flops_saved_pct']:.1f}%"),
        ("KV entries saved", f"{t['kv_saved_pct']:.1f}%"),
        ("tokens / s", f"{t['tokens_per_s']:.1f}"),
        ("wall-clock speedup", f"×{speedup:.2f}" if speedup else "—"),
    ]
    body = "".join(f"<div class='counter'><div class='value'>{html.escape(v)}</div>"
                   f"<div class='name'>{html.escape(k)}</div></div>" for k, v in cells)
    kv = trace.settings.get("kv_mode")
    hint = (f"<b>{html.escape(str(kv))}</b> KV: {html.escape(KV_MODE_SAVINGS[kv])} " if kv in KV_MODE_SAVINGS else "") + \
        "Total FLOPs include the exit decisions (an LM head per loop for confidence)."
    state = "<span class='live'>● generating</span>" if running else ""
    return f"<div class='counters'>{body}</div><div class='counter-hint'>{state} {hint}</div>"


def token_details(trace: GenerationTrace | None, index: int | None) -> str:
    """Per-loop signals, threshold, top-5 candidates and exit reason of one token."""
    if trace is None or index is None or not 0 <= index < len(trace.steps):
        return "<div class='token-details empty'>Click a token to see why it stopped where it did.</div>"
    s: TokenStep = trace.steps[index]
    rows = []
    for loop in s.loops:
        top = ", ".join(f"<code>{html.escape(repr(t)[1:-1])}</code> {p:.2f}" for t, p in (loop.top_tokens or []))
        sig = "—" if loop.signal is None else f"{loop.signal:.3f}"
        mp = "—" if loop.max_prob is None else f"{loop.max_prob:.3f}"
        extra = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in (loop.extra or {}).items())
        rows.append(f"<tr><td>{loop.loop}</td><td>{sig}</td><td>{mp}</td><td>{loop.change:.3f}</td>"
                    f"<td>{html.escape(extra) or '—'}</td><td>{top or '—'}</td></tr>")
    threshold = "—" if s.threshold is None else f"{s.threshold:.2f}"
    return (
        f"<div class='token-details'><div class='token-title'>Token {s.index}: "
        f"<code>{html.escape(repr(s.text))}</code> · depth {s.depth}/{s.max_depth} · "
        f"exit: <b>{html.escape(s.exit_reason)}</b> · signal: {html.escape(s.signal_name or 'none')} · "
        f"threshold {threshold} · {s.total_flops / 1e6:.1f} MFLOP (full depth {s.flops_full / 1e6:.1f})</div>"
        "<table><thead><tr><th>loop</th><th>signal</th><th>max prob</th><th>cosine to previous loop</th>"
        f"<th>router / halting</th><th>top-5 candidates at this loop</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def _text_on(colour: str) -> str:
    """Black or white text, whichever reads better on ``colour`` (#RRGGBB)."""
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return "#111" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


def legend_html(max_depth: int) -> str:
    chips = "".join(f"<span class='chip' style='background:{c};color:{_text_on(c)}'>{html.escape(l)}</span>"
                    for l, c in colour_map(max_depth).items())
    return f"<div class='legend'>{chips}</div>"


def model_card(description: dict, note: str = "") -> str:
    """The Model tab: what is loaded, in numbers."""
    d = description
    p = d.get("parameters", {})
    training = d.get("training")
    trained = training_table(training) if training else \
        "<p>Not trained: a direct conversion of the pretrained model.</p>"
    rows = [
        ("model", d.get("name")), ("base", d.get("base_model")), ("sharing scheme", d.get("sharing")),
        ("loops", d.get("num_loops")), ("unique layers in the looped block", d.get("block_size")),
        ("prelude / coda layers", f"{d.get('num_prelude')} / {d.get('num_coda')}"),
        ("unrolled positions (effective depth)", d.get("num_positions")), ("shared-block init", d.get("init_method")),
        ("LoRA rank per position", d.get("lora_rank")),
        ("unique parameters", f"{p.get('unique', 0) / 1e6:.1f} M ({p.get('unique_non_embedding', 0) / 1e6:.1f} M non-embedding)"),
        ("effective parameters", f"{p.get('effective', 0) / 1e6:.1f} M ({p.get('effective_non_embedding', 0) / 1e6:.1f} M non-embedding)"),
        ("of which LoRA", f"{p.get('lora', 0) / 1e6:.1f} M"),
        ("routers (Mixture-of-Recursions)", d.get("router_type") or "none"),
        ("learned halting heads", "yes" if d.get("halting_heads") else "no"),
    ]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    note_html = f"<p class='note'>{html.escape(note)}</p>" if note else ""
    return f"<div class='model-card'>{note_html}<table>{table}</table><h4>How it was trained</h4>{trained}</div>"


def training_table(training: dict) -> str:
    """A checkpoint's provenance (``config.training``) as one row per stage, then each stage's command."""
    stages = training.get("stages") or []
    head = ("<tr><th>stage</th><th>tokens</th><th>steps</th><th>device</th><th>wall</th>"
            "<th>validation PPL per loop</th><th>agreement per loop</th></tr>")
    rows, commands = [], []
    for s in stages:
        val = s.get("val") or {}
        ppl = " / ".join(f"{x:.3g}" for x in val.get("ppl", [])) or "–"
        agree = " / ".join(f"{x:.2f}" for x in val.get("agreement", [])) or "–"
        rows.append(f"<tr><td>{html.escape(str(s.get('stage', '?')))}</td><td>{s.get('tokens_seen', 0):,}</td>"
                    f"<td>{s.get('steps', '–')}</td><td>{html.escape(str(s.get('device', 'CPU')))}</td>"
                    f"<td>{s.get('wall_seconds', '–')} s</td><td>{ppl}</td><td>{agree}</td></tr>")
        for command in s.get("commands") or [s.get("command", "")]:
            commands.append(f"<li><code>{html.escape(command)}</code></li>")
    extra = ""
    check = training.get("artifact")
    if check:
        extra = (f"<p>Committed artifact: {check.get('bytes', 0) / 1e6:.1f} MB"
                 f"{' (int8 LoRA)' if check.get('int8') else ''}; validation PPL on its {check.get('rows')} check rows "
                 f"{check.get('ppl_rebuilt', 0):.2f} as rebuilt vs {check.get('ppl_fp32', 0):.2f} before export.</p>")
    return (f"<table>{head}{''.join(rows)}</table>{extra}"
            f"<details><summary>Commands</summary><ul>{''.join(commands)}</ul></details>")


def layout_diagram(description: dict) -> str:
    """The unrolled positions as boxes; boxes of one colour share their weights."""
    layer_map = description.get("layer_map") or []
    n_pre, n_coda, k = description.get("num_prelude", 0), description.get("num_coda", 0), description.get("block_size", 0)
    palette = ["#4477AA", "#EE6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377", "#BBBBBB"]
    boxes = []
    for p, u in enumerate(layer_map):
        if p < n_pre:
            group = "prelude"
        elif p >= len(layer_map) - n_coda:
            group = "coda"
        else:
            group = f"loop {(p - n_pre) // k + 1}" if k else "loop"
        colour = palette[u % len(palette)]
        boxes.append((group, f"<div class='pos' style='background:{colour}' title='position {p} runs unique "
                             f"layer {u}'>{u}</div>"))
    groups: dict[str, list[str]] = {}
    for g, b in boxes:
        groups.setdefault(g, []).append(b)
    body = "".join(f"<div class='pos-group'><div class='pos-label'>{html.escape(g)}</div>"
                   f"<div class='pos-row'>{''.join(bs)}</div></div>" for g, bs in groups.items())
    return ("<div class='layout'><p>Each box is one unrolled layer position, labelled by the unique layer "
            "whose weights it runs: same number and colour = the very same tensors. Each position "
            f"adds its own LoRA and norms.</p>{body}</div>")


def ghost_line(teacher_text: str, agreement: float) -> str:
    """The teacher's answer under the recursive model's, with how often it agrees token by token."""
    return (f"<div class='ghost'><span class='ghost-label'>teacher (SmolLM2, no sharing):</span> "
            f"{html.escape(teacher_text)}<div class='ghost-note'>the teacher's own top-1 choice for "
            f"<b>{agreement:.2f}</b> of the answer's tokens above (teacher-forced)</div></div>")


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def conversion_report(report: dict | None) -> str:
    """The Convert tab's numbers: parameters before/after, the held-out check, the layer map."""
    if not report:
        return "<div class='conversion empty'>Pick a base and settings, then press Convert.</div>"
    c, p = report["config"], report["params"]
    rows = [("base", report.get("base", "?"), ""),
            ("layout", f"{c['base_layers']} layers", f"{c['positions']} positions: {c['num_loops']} loops × "
                                                     f"{c['block_size']} ({c['sharing']}, init {c['init']})"),
            ("LoRA rank", "–", f"{c['lora_rank']} ({'activation-aware' if c.get('lora_init') == 'asvd' else 'plain'}"
                                " SVD init)"),
            ("unique parameters", _millions(p["base"]), f"{_millions(p['unique'])} "
                                                        f"({100 * p['unique_share_of_base']:.0f}% of the base)"),
            ("of which LoRA", "–", _millions(p["lora"])),
            ("effective parameters", _millions(p["base"]), _millions(p["effective"]))]
    held = report.get("held_out")
    if held:
        rows += [("held-out perplexity", f"{held['base_ppl']:.2f}", f"{held['ppl']:.2f}"),
                 ("top-1 agreement with the base", "1.00", f"{held['agreement']:.3f}"),
                 ("KL(base ‖ converted)", "0", f"{held['kl']:.3f}")]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(b))}</td><td>{html.escape(str(a))}</td></tr>"
                    for k, b, a in rows)
    note = (f"<p class='note'>Held-out check on {held['tokens']} tokens of a fixed English text, "
            f"after the last loop; per loop: perplexity "
            f"{' / '.join(f'{x:.1f}' for x in held['per_loop']['ppl'])}, agreement "
            f"{' / '.join(f'{x:.2f}' for x in held['per_loop']['agreement'])}.</p>") if held else ""
    worst = report["summary"]["max_error"]
    outputs = report["summary"].get("mean_output_error")
    out_note = (f" Mean relative error of the looped projections' <i>outputs</i> on the calibration text: "
                f"<b>{sum(outputs.values()) / len(outputs):.3f}</b> (what the activation-aware init minimises)."
                if outputs else "")
    return (f"<div class='conversion'><table><tr><th></th><th>before (base)</th><th>after (converted)</th></tr>"
            f"{table}</table>{note}<p>Largest relative reconstruction error of any projection's weights: "
            f"<b>{worst:.3f}</b>.{out_note}</p></div>")


def layer_map_table(report: dict | None) -> str:
    """Position → role, loop, unique layer, original layer; with the shared-weights diagram above it."""
    if not report:
        return ""
    c, rows = report["config"], report["layer_map"]
    diagram = layout_diagram({"layer_map": [r["unique"] for r in rows], "block_size": c["block_size"],
                              "num_prelude": sum(r["role"] == "prelude" for r in rows),
                              "num_coda": sum(r["role"] == "coda" for r in rows)})
    body = "".join(f"<tr><td>{r['position']}</td><td>{r['role']}</td><td>{r['loop'] or '–'}</td><td>{r['unique']}</td>"
                   f"<td>{r['original']}</td><td>{', '.join(map(str, r['sources']))}</td></tr>" for r in rows)
    return (f"{diagram}<details class='layer-map'><summary>Layer map table</summary><table><tr><th>position</th>"
            f"<th>role</th><th>loop</th><th>unique layer</th><th>stands for original layer</th>"
            f"<th>shared weights from</th></tr>{body}</table></details>")
