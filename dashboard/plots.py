"""Plotly figures built from traces and sweep results (never from the model)."""
from __future__ import annotations

import plotly.graph_objects as go

from model.inference.trace import LAYER_COMPONENTS, TIME_COMPONENTS, GenerationTrace

from .render import colour_map, depth_label

LAYOUT = dict(template="plotly_white", margin=dict(l=50, r=20, t=40, b=40), height=280,
              font=dict(size=12), legend=dict(orientation="h", y=-0.25))


def _tokens(trace: GenerationTrace) -> list[str]:
    return [repr(s.text)[1:-1] for s in trace.steps]


def depth_per_token(trace: GenerationTrace | None) -> go.Figure:
    fig = go.Figure()
    if trace and trace.steps:
        max_depth = trace.steps[0].max_depth
        colours = colour_map(max_depth)
        fig.add_bar(x=list(range(len(trace.steps))), y=[s.depth for s in trace.steps],
                    marker_color=[colours[depth_label(s.depth)] for s in trace.steps],
                    hovertext=[f"{t!s} · {s.exit_reason}" for t, s in zip(_tokens(trace), trace.steps)],
                    hoverinfo="text+y", name="depth")
        fig.update_yaxes(range=[0, max_depth + 0.3], dtick=1)
    fig.update_layout(title="Loops used per token", xaxis_title="generated token", yaxis_title="loops", **LAYOUT)
    return fig


def signal_heatmap(trace: GenerationTrace | None) -> go.Figure:
    """Loops x tokens of the exit signal; the colour scale is centred on the threshold."""
    fig = go.Figure()
    title = "Exit signal per loop"
    if trace and trace.steps:
        max_depth = trace.steps[0].max_depth
        z = [[None] * len(trace.steps) for _ in range(max_depth)]
        fixed = trace.steps[0].signal_name is None  # no exit signal: show the inspected confidence instead
        for i, s in enumerate(trace.steps):
            for l in s.loops:
                z[l.loop - 1][i] = l.max_prob if fixed else l.signal
        threshold = None if fixed else trace.steps[0].threshold
        name = "max prob (inspected)" if fixed else trace.steps[0].signal_name
        fig.add_heatmap(z=z, x=list(range(len(trace.steps))), y=[f"loop {r}" for r in range(1, max_depth + 1)],
                        colorscale="RdBu", zmid=threshold if threshold is not None else None,
                        colorbar=dict(title=name, len=0.9), hoverongaps=False,
                        text=[_tokens(trace)] * max_depth, hovertemplate="%{text}<br>%{y}: %{z:.3f}<extra></extra>")
        fig.add_scatter(x=list(range(len(trace.steps))), y=[f"loop {s.depth}" for s in trace.steps],
                        mode="markers", marker=dict(symbol="x", size=8, color="black"), name="exit")
        title = f"Exit signal ({name})" + (f", threshold {threshold:.2f} = white" if threshold is not None else "")
    fig.update_layout(title=title, xaxis_title="generated token", **LAYOUT)
    return fig


def cumulative_compute(trace: GenerationTrace | None) -> go.Figure:
    fig = go.Figure()
    if trace and trace.steps:
        used, full, u, f = [], [], 0.0, 0.0
        for s in trace.steps:
            u += s.total_flops
            f += s.flops_full
            used.append(u / 1e9)
            full.append(f / 1e9)
        x = list(range(1, len(trace.steps) + 1))
        # the run first, full depth on top: where they coincide the dashed line stays visible
        fig.add_scatter(x=x, y=used, name="this run (incl. decisions)", line=dict(color="#2A788E", width=4))
        fig.add_scatter(x=x, y=full, name="full depth", line=dict(color="#444", dash="dash", width=2))
    fig.update_layout(title="Compute used vs full depth (cumulative)", xaxis_title="generated tokens",
                      yaxis_title="GFLOP", **LAYOUT)
    return fig


def compare_chart(points: list[dict]) -> go.Figure:
    """Quality (teacher-forced agreement with the full-depth answer) vs compute, one point per column."""
    fig = go.Figure()
    for i, p in enumerate(points):  # labels alternate above and below: columns often sit close together
        fig.add_scatter(x=[100 - p["saved_pct"]], y=[p["agreement"]], mode="markers+text", text=[p["label"]],
                        textposition="top center" if i % 2 == 0 else "bottom center", marker=dict(size=12),
                        name=p["label"], cliponaxis=False)
    xs = [100 - p["saved_pct"] for p in points] or [100]
    pad = max(5.0, 0.15 * (max(xs) - min(xs)))  # room for the labels at both ends
    fig.update_layout(title="Quality vs compute (teacher-forced on the full-depth answer)",
                      xaxis_title="compute per token, % of full depth", yaxis_title="top-1 agreement with full depth",
                      yaxis_range=[-0.05, 1.22], xaxis_range=[min(xs) - pad, max(xs) + pad], showlegend=False,
                      **{**LAYOUT, "margin": dict(l=50, r=30, t=60, b=40)})
    return fig


def sweep_chart(result: dict | None, metric: str = "agreement") -> go.Figure:
    fig = go.Figure()
    if result:
        fam = result["family"]
        fig.add_scatter(x=[100 - p["saved_pct"] for p in fam], y=[p[metric] for p in fam], mode="lines+markers",
                        name=f"{result['policy']} thresholds",
                        text=[f"threshold {p['threshold']:.3f}, avg depth {p['avg_depth']:.2f}" for p in fam])
        fixed = result["fixed"]
        fig.add_scatter(x=[100 - p["saved_pct"] for p in fixed], y=[p[metric] for p in fixed], mode="lines+markers",
                        name="fixed depth (static truncation)", line=dict(dash="dot", color="#888"),
                        text=[f"depth {int(p['threshold'])}" for p in fixed])
        cur = result["current"]
        fig.add_scatter(x=[100 - cur["saved_pct"]], y=[cur[metric]], mode="markers", name=f"current: {cur['label']}",
                        marker=dict(symbol="star", size=16, color="#EE6677"))
    label = "top-1 agreement with full depth" if metric == "agreement" else "perplexity (lower is better)"
    fig.update_layout(title=f"{label} vs compute", xaxis_title="compute per token, % of full depth",
                      yaxis_title=label, **{**LAYOUT, "height": 340})
    if metric == "perplexity":
        fig.update_yaxes(type="log")
    return fig


def kv_view(trace: GenerationTrace | None) -> go.Figure:
    """MoR Fig. 2c style: per loop, which generated tokens' keys each query sees (token x token)."""
    from plotly.subplots import make_subplots

    if not trace or not trace.steps:
        fig = go.Figure()
        fig.update_layout(title="KV visibility per loop", **LAYOUT)
        return fig
    loops = trace.steps[0].max_depth
    n = min(len(trace.steps), 48)  # keep the grid readable
    fig = make_subplots(rows=1, cols=loops, subplot_titles=[f"loop {r}" for r in range(1, loops + 1)],
                        horizontal_spacing=0.04)
    scale = [[0, "#f4f4f4"], [0.5, "#2A788E"], [1, "#E69F00"]]
    for r in range(1, loops + 1):
        grid = [row[:n] for row in trace.kv_visibility(r)[:n]]
        fig.add_heatmap(z=grid, zmin=0, zmax=2, colorscale=scale, showscale=False, row=1, col=r,
                        hovertemplate="query %{y} → key %{x}: %{z}<extra></extra>")
        fig.update_yaxes(autorange="reversed", row=1, col=r)
    mode = trace.settings.get("kv_mode")
    fig.update_layout(title=f"KV seen per loop ({mode}) · teal exact · orange approx./shared · grey absent",
                      **{**LAYOUT, "height": 320})
    return fig


def signal_histograms(trace: GenerationTrace | None) -> go.Figure:
    """Distribution of the exit signal at each loop (router scores for MoR; bimodal when healthy)."""
    fig = go.Figure()
    if trace and trace.steps:
        loops = trace.steps[0].max_depth
        for r in range(1, loops + 1):
            values = [l.signal for s in trace.steps for l in s.loops if l.loop == r and l.signal is not None]
            if values:
                fig.add_histogram(x=values, name=f"loop {r}", opacity=0.6, nbinsx=20)
        fig.update_layout(barmode="overlay")
        name = trace.steps[0].signal_name or "signal"
        fig.update_layout(title=f"{name} per loop (histogram)", xaxis_title=name, yaxis_title="tokens", **LAYOUT)
    else:
        fig.update_layout(title="Exit signal per loop (histogram)", **LAYOUT)
    return fig


def gantt(run: dict, max_depth: int) -> go.Figure:
    """A strategy's measured schedule: rows = requests, x = engine steps, colour = the loop each
    request ran in that step's single block call (grey = prefill chunk, pale = idle/waiting)."""
    requests = [r["request_id"] for r in run["requests"]]
    row = {rid: i for i, rid in enumerate(requests)}
    steps = run["schedule"]
    z = [[None] * len(steps) for _ in requests]
    for x, rec in enumerate(steps):
        for rid in rec["idle"]:
            if rid in row:
                z[row[rid]][x] = 0
        for item in rec["items"]:
            if item["request_id"] in row:
                z[row[item["request_id"]]][x] = -1 if item["kind"] == "prefill" else item["loop"]
    from .render import depth_colours

    colours = ["#9e9e9e", "#eeeeee", *depth_colours(max_depth)]  # prefill, idle, loop 1..max
    n = len(colours)
    scale = []
    for i, c in enumerate(colours):  # a discrete colour scale over the values -1..max_depth
        scale += [[i / n, c], [(i + 1) / n, c]]
    fig = go.Figure(go.Heatmap(z=z, x=list(range(len(steps))), y=requests, zmin=-1.5, zmax=max_depth + 0.5,
                               colorscale=scale, hoverongaps=False,
                               colorbar=dict(title="loop", tickvals=list(range(-1, max_depth + 1)),
                                             ticktext=["prefill", "idle", *[str(d) for d in range(1, max_depth + 1)]]),
                               hovertemplate="%{y}, step %{x}: %{z}<extra></extra>"))
    m = run["metrics"]
    speed = f", ×{m['speedup_vs_static']:.2f} vs static" if m.get("speedup_vs_static") else ""
    fig.update_layout(title=f"{run['strategy']}: {m['tokens_per_s']:.1f} tok/s{speed}, {m['block_calls']} block calls, "
                            f"{m['mean_items_per_call']:.1f} items per call",
                      xaxis_title="engine step (one shared-block call)", yaxis_title="request",
                      **{**LAYOUT, "height": max(280, 130 + 26 * len(requests))})
    fig.update_yaxes(type="category", dtick=1)
    return fig


def threshold_lab(view: dict | None, trace: GenerationTrace | None = None) -> go.Figure:
    """FREE's adaptive threshold: calibration confidences by label, the two fitted Beta densities, the
    posterior of "consistent" and the threshold it sets (left); the threshold over the run (right)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], specs=[[{"secondary_y": True}, {}]],
                        subplot_titles=("calibration pairs and the fitted mixture", "threshold in force"))
    if view:
        for key, colour in (("consistent", "#2A788E"), ("inconsistent", "#EE6677")):
            fig.add_histogram(x=view[key], name=f"{key} ({len(view[key])})", histnorm="probability density",
                              xbins=dict(start=0, end=1, size=0.05), opacity=0.45, marker_color=colour, row=1, col=1)
            if view["fitted"]:
                fig.add_scatter(x=view["grid"], y=view[f"pdf_{key}"], name=f"Beta fit: {key}",
                                line=dict(color=colour, width=2), row=1, col=1)
        if view["fitted"]:
            fig.add_scatter(x=view["grid"], y=view["posterior"], name="P(consistent | confidence)",
                            line=dict(color="#444", dash="dot"), row=1, col=1, secondary_y=True)
        fig.add_vline(x=view["threshold"], line=dict(color="#333", width=2), row=1, col=1,
                      annotation_text=f"threshold {view['threshold']:.2f} (ζ = {view['zeta']})")
        fig.add_scatter(x=list(range(len(view["history"]))), y=view["history"], mode="lines+markers",
                        name="threshold per sequence", line=dict(color="#2A788E"), row=1, col=2)
    if trace is not None and trace.steps:
        fig.add_scatter(x=[s.index for s in trace.steps], y=[s.threshold for s in trace.steps], mode="lines",
                        name="threshold per token (this run)", line=dict(color="#EE6677"), row=1, col=2)
    fig.update_xaxes(title_text=(view or {}).get("measure", "confidence") + " at exit", range=[0, 1], row=1, col=1)
    fig.update_xaxes(title_text="sequence (blue) · token of this run (red)", row=1, col=2)
    fig.update_yaxes(title_text="density", row=1, col=1)
    fig.update_yaxes(title_text="posterior", range=[0, 1], row=1, col=1, secondary_y=True)
    fig.update_layout(barmode="overlay", **{**LAYOUT, "height": 330, "margin": dict(l=50, r=50, t=60, b=40)})
    return fig


TIME_LABELS = {"prefill": "prefill", "block": "block loops", "catchup": "FREE catch-up", "decision": "exit decisions",
               "head": "emitted head", "inspect": "top-5 per loop (display)", "kv": "KV of skipped loops",
               "sampling": "sampling + detokenisation"}
FLOP_GROUPS = {"block loops": [c for c in LAYER_COMPONENTS if c not in ("catchup", "kv_copy")],
               "FREE catch-up": ["catchup"], "exit decisions": ["decision"], "KV of skipped loops": ["kv_copy"],
               "emitted head": ["head"]}


def time_breakdown(trace: GenerationTrace | None) -> go.Figure:
    """Where the time goes: measured wall-clock by component beside the FLOP ledger, as shares, so one
    sees when FLOPs saved do (or do not) become time saved. Each bar segment's hover gives the amount."""
    fig = go.Figure()
    if trace and trace.steps:
        times = {"prefill": trace.prefill.get("wall_ms", 0.0)}
        for component in TIME_COMPONENTS:
            times[component] = sum(s.time_ms.get(component, 0.0) for s in trace.steps)
        flops = {g: sum(s.flops.get(c, 0.0) for s in trace.steps for c in comps) for g, comps in FLOP_GROUPS.items()}
        flops = {"prefill": trace.prefill.get("flops", 0.0), **flops,
                 TIME_LABELS["inspect"]: sum(s.inspected_flops for s in trace.steps)}
        total_t, total_f = sum(times.values()) or 1.0, sum(flops.values()) or 1.0
        palette = ["#BBBBBB", "#2A788E", "#7AD151", "#EE6677", "#999999", "#CCBB44", "#FDE725", "#414487"]
        colour = dict(zip(TIME_LABELS.values(), palette))  # one colour per component on both bars
        for key, label in TIME_LABELS.items():
            fig.add_bar(y=["wall-clock (measured)"], x=[100 * times[key] / total_t], name=label, orientation="h",
                        marker_color=colour[label], legendgroup=label, hovertext=[f"{times[key]:.0f} ms"])
        for label, value in flops.items():
            fig.add_bar(y=["FLOPs (counted)"], x=[100 * value / total_f], name=label, orientation="h",
                        marker_color=colour.get(label, "#555555"), legendgroup=label, showlegend=label not in colour,
                        hovertext=[f"{value / 1e9:.2f} GFLOP"])
    fig.update_layout(barmode="stack", title="Where the time goes (share of the run, %)", xaxis_title="%",
                      **{**LAYOUT, "height": 260, "legend": dict(orientation="h", y=-0.45)})
    return fig


def reconstruction_heatmap(report: dict | None) -> go.Figure:
    """Positions × projections: ||W_orig − (W_shared + BA)||_F / ||W_orig||_F, or, for the activation-aware
    init, the relative error of the projection's outputs on the calibration text (what that init minimises)."""
    fig = go.Figure()
    title = "Relative reconstruction error at the chosen LoRA rank"
    if report:
        names = report["projections"]
        key = "output_error" if "output_error" in report["positions"][0] else "error"
        z = [[p[key][n] for n in names] for p in report["positions"]]
        y = [f"pos {p['position']} (orig {p['original']})" for p in report["positions"]]
        top = max(0.05, max(max(row) for row in z))  # errors below 5% all look small
        fig.add_heatmap(z=z, x=names, y=y, colorscale="Viridis", zmin=0, zmax=top, colorbar=dict(title="rel. error"),
                        hovertemplate="%{y} · %{x}: %{z:.4f}<extra></extra>")
        fig.update_yaxes(autorange="reversed")
        if key == "output_error":
            title = "Relative output error on the calibration text at the chosen LoRA rank"
    fig.update_layout(**{**LAYOUT, "height": max(280, 18 * len(report["positions"]) + 80) if report else 280},
                      title=title)
    return fig


def energy_vs_rank(report: dict | None) -> go.Figure:
    """Share of ||W_orig − W_shared||² captured by the top-r singular values, averaged over looped positions."""
    fig = go.Figure()
    if report:
        for name, curve in report["summary"]["mean_energy"].items():
            fig.add_scatter(x=report["ranks"], y=curve, mode="lines+markers", name=name)
        rank = report["config"]["lora_rank"]
        if isinstance(rank, int) and rank > 0:  # a line trace, not add_vline: shapes on a log axis take log10(x)
            fig.add_scatter(x=[rank, rank], y=[0, 1], mode="lines", name=f"chosen rank {rank}",
                            line=dict(color="black", dash="dot"))
        fig.update_xaxes(type="log", tickvals=report["ranks"], ticktext=[str(r) for r in report["ranks"]])
        fig.update_yaxes(range=[0, 1.02])
    fig.update_layout(title="Captured energy vs LoRA rank (singular values of W_orig − W_shared)",
                      xaxis_title="rank", yaxis_title="share of σ²", **LAYOUT)
    return fig
