"""The Gradio Blocks app: layout first, then events. Handlers call ``ModelService`` and render traces."""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import gradio as gr

from model.paths import ASSETS_DIR
from model.inference.trace import GenerationTrace

from . import plots, render
from .service import (CONVERT_INIT, CONVERT_LORA_INIT, CONVERT_SHARING, ConvertOptions, ModelService, ServiceError,
                      batching_lab, hub_allowed, load_share_file, load_trace, start_shared)
from .settings import KV_CHOICES, MAX_NEW_TOKENS, POLICY_CHOICES, Settings, SettingsError, from_share, share_dict

try:  # Hugging Face Spaces with ZeroGPU: GPU-bound handlers borrow a GPU per call
    import spaces

    gpu = spaces.GPU
except ImportError:  # plain CPU (and every machine without the `spaces` package)
    def gpu(fn):
        return fn

log = logging.getLogger(__name__)
PLOT_EVERY_S = 0.8  # refresh the live figures at most this often while streaming
USER_ERRORS = (ServiceError, SettingsError, ValueError)

INTRO = """
# Adaptive-Depth Lab
A **recursive** language model runs one block of shared layers in **loops**. For every new token a
policy decides after each loop whether to stop — so easy tokens can leave early and hard ones go deep.
Each token below is coloured by the **number of loops** it used (light = shallow, dark = deep);
click a token to see its per-loop signals and why it stopped. Counters show the compute saved
against running every token at full depth.
"""


def user_errors(fn):
    """Turn known failures into a clear message on the page and unknown ones into a short one.

    Never lets a stack trace reach the browser (it goes to the server log)."""

    def convert(exc: Exception) -> gr.Error:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, USER_ERRORS):
            return gr.Error(str(exc))
        log.exception("unexpected error in %s", fn.__name__)
        return gr.Error(f"Something went wrong ({type(exc).__name__}). Try other settings or reload the page.")

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the boundary to the browser
                raise convert(exc) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise convert(exc) from None
    return wrapper


def _examples() -> list[str]:
    try:
        return json.loads((ASSETS_DIR / "examples.json").read_text())
    except (OSError, json.JSONDecodeError):
        return ["What is the capital of France?"]


def _sweep_text() -> str:
    path = ASSETS_DIR / "sweep_text.txt"
    return path.read_text().strip() if path.exists() else ""


KEEP_TRACES = 16  # trace files kept for download; older ones are deleted as new runs finish
MAX_UPLOAD = "5mb"  # Gradio's upload endpoint refuses larger files (413)
CACHE_CLEANUP = (600, 3600)  # every 10 min, Gradio deletes files it cached for this app over an hour ago


def trace_dir() -> Path:
    """This process's folder of downloadable trace files (under the system temp folder)."""
    folder = Path(tempfile.gettempdir()) / f"adaptive-depth-lab-traces-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    return folder


def _write_download(prefix: str, data: dict) -> str:
    """Write a JSON file for a download button, keeping only the newest ``KEEP_TRACES`` of this kind."""
    tmp = tempfile.NamedTemporaryFile("w", suffix=".json", prefix=f"{prefix}-", delete=False, dir=trace_dir())
    with tmp:
        json.dump(data, tmp, indent=1)
    old = sorted(trace_dir().glob(f"{prefix}-*.json"), key=lambda p: p.stat().st_mtime)[:-KEEP_TRACES]
    for path in old:
        path.unlink(missing_ok=True)
    return tmp.name


def _write_trace(trace: GenerationTrace) -> str:
    return _write_download("trace", trace.to_dict())


def launch_options() -> dict:
    """Keyword arguments of ``demo.launch`` that every way of serving the app shares."""
    return dict(css=css(), show_error=True, max_file_size=MAX_UPLOAD)


COMPARE_PRESETS = [
    dict(policy="fixed", threshold=0.5, depth=None, enabled=True, title="Full depth"),
    dict(policy="fixed", threshold=0.5, depth=1, enabled=True, title="Fixed depth 1"),
    # thresholds from the trained default's sweep (docs/RESULTS.md): a visible mix of depths
    dict(policy="confidence", threshold=0.2, depth=1, enabled=True, title="Confidence"),
    dict(policy="saturation", threshold=0.7, depth=1, enabled=True, title="Saturation"),
]


def loop_slider_max(loops: int) -> int:
    """A loop slider's maximum: Gradio refuses a slider whose minimum equals its maximum, so a 1-loop
    model (a plain Llama) gets 2 and its settings' validation refuses depth 2 with a clear message."""
    return max(2, loops)


def build_app(service: ModelService) -> gr.Blocks:
    loaded = service.current
    loops = loaded.num_loops
    top = loop_slider_max(loops)
    first_policy, first_threshold, first_kv = loaded.opening_setting()
    with gr.Blocks(title="Adaptive-Depth Lab", delete_cache=CACHE_CLEANUP) as demo:
        gr.Markdown(INTRO, elem_id="intro")
        model_note = gr.Markdown(f"**Loaded:** {loaded.label}. {loaded.note}", elem_id="model-note")
        trace_state = gr.State(None)
        with gr.Tabs() as tabs:
            # ---------------------------------------------------------------- Live
            with gr.Tab("Live", id="live"):
                with gr.Row():
                    with gr.Column(scale=3):
                        prompt = gr.Textbox(label="Prompt", lines=3, value=_examples()[0], elem_id="prompt")
                        with gr.Row():
                            chat = gr.Checkbox(value=True, label="Chat template (instruct model)")
                            time_full = gr.Checkbox(value=False, label="Also time a full-depth run (wall-clock speedup)")
                            shared = gr.Checkbox(value=True, label="Share batches with other users (CDB engine)",
                                                 info="every policy and KV mode; off: a solo run of this prompt")
                            ghost = gr.Checkbox(value=False, label="Show the teacher's answer",
                                                info="the original SmolLM2's greedy answer under this one",
                                                elem_id="ghost-on")
                        run_btn = gr.Button("Generate", variant="primary", elem_id="run")
                        gr.Examples(_examples(), inputs=[prompt], label="Examples")
                    with gr.Column(scale=2):
                        policy = gr.Dropdown(POLICY_CHOICES, value=first_policy, label="Depth policy",
                                             elem_id="policy")
                        threshold = gr.Slider(-1.0, 1.0, value=first_threshold, step=0.01, label="Threshold",
                                              info="confidence/halting: 0..1 · saturation: cosine · adaptive: "
                                                   "starting value · router: logit bias")
                        measure = gr.Dropdown(["max_prob", "top2_gap", "entropy"], value="max_prob",
                                              label="Confidence measure")
                        with gr.Row():
                            depth = gr.Slider(1, top, value=1, step=1, label="Fixed depth")
                            max_loops = gr.Slider(1, top, value=loops, step=1, label="Max loops")
                        kv_mode = gr.Radio(KV_CHOICES, value=first_kv, label="KV for exited tokens",
                                           info="sync: FREE's exact parallel catch-up · copy: CALM's state copying")
                        with gr.Accordion("Decoding", open=False):
                            max_new = gr.Slider(1, MAX_NEW_TOKENS, value=48, step=1, label="Max new tokens",
                                                elem_id="max-new")
                            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                            rep_pen = gr.Slider(1.0, 2.0, value=1.1, step=0.05, label="Repetition penalty")
                            seed = gr.Number(value=0, precision=0, label="Seed")
                legend = gr.HTML(render.legend_html(loops), elem_id="legend")
                tokens = gr.HighlightedText(label="Answer, coloured by loops used (click a token)",
                                            color_map=render.colour_map(loops), show_legend=False,
                                            show_inline_category=False, combine_adjacent=False,
                                            elem_id="tokens")
                ghost_line = gr.HTML("", elem_id="ghost-line")
                counters = gr.HTML(render.counters(None), elem_id="counters")
                details = gr.HTML(render.token_details(None, None), elem_id="token-details")
                with gr.Row():
                    depth_plot = gr.Plot(plots.depth_per_token(None), elem_id="depth-plot")
                    compute_plot = gr.Plot(plots.cumulative_compute(None), elem_id="compute-plot")
                heatmap = gr.Plot(plots.signal_heatmap(None), elem_id="heatmap")
                with gr.Row():
                    kv_plot = gr.Plot(plots.kv_view(None), elem_id="kv-view")
                    hist_plot = gr.Plot(plots.signal_histograms(None), elem_id="signal-hist")
                time_plot = gr.Plot(plots.time_breakdown(None), elem_id="time-plot")
                with gr.Row():
                    trace_file = gr.File(label="Trace (JSON)", interactive=False, elem_id="trace-file")
                    share_file = gr.File(label="Share file (prompt + settings + model)", interactive=False,
                                         elem_id="share-file")
                    status = gr.Markdown("", elem_id="status")
                with gr.Accordion("Threshold lab (FREE's adaptive threshold)", open=False, elem_id="threshold-lab"):
                    gr.Markdown("For the **adaptive** policy: the calibration pairs that caught-up tokens gave "
                                "(exit confidence, and whether the exit prediction matched full depth), the two "
                                "fitted Beta components, the posterior of *consistent* and the threshold it sets; "
                                "and the threshold over the sequences and over the last run. Pairs come from "
                                "**sync** KV runs.")
                    with gr.Row():
                        thr_btn = gr.Button("Show the threshold lab", elem_id="threshold-run", scale=0)
                        thr_note = gr.Markdown("", elem_id="threshold-note")
                    thr_plot = gr.Plot(plots.threshold_lab(None), elem_id="threshold-plot")
                with gr.Accordion("Replay a trace file (no model needed)", open=False, elem_id="replay"):
                    with gr.Row():
                        replay_file = gr.File(label="Trace JSON (this page's download, `python -m model.inference "
                                                    "--json`, or the server)", file_types=[".json"],
                                              elem_id="replay-file")
                        replay_btn = gr.Button("Replay", elem_id="replay-run", scale=0)
                    with gr.Row():
                        share_in = gr.File(label="Share file: puts its prompt and settings into this tab",
                                           file_types=[".json"], elem_id="share-in")
                        share_btn = gr.Button("Load settings", elem_id="share-load", scale=0)
            # ---------------------------------------------------------------- Compare
            with gr.Tab("Compare", id="compare"):
                gr.Markdown("One prompt, several depth settings. Quality is the teacher-forced top-1 agreement "
                            "with the full-depth answer; compute is per token, as a share of full depth.")
                with gr.Row():
                    cmp_prompt = gr.Textbox(label="Prompt", value=_examples()[1], lines=2, scale=4,
                                            elem_id="cmp-prompt")
                    cmp_new = gr.Slider(4, 128, value=32, step=1, label="Max new tokens", scale=1)
                    cmp_btn = gr.Button("Run all columns", variant="primary", scale=1, elem_id="cmp-run")
                col_inputs, col_texts, col_counters = [], [], []
                with gr.Row():
                    for i, preset in enumerate(COMPARE_PRESETS):
                        with gr.Column(min_width=220):
                            gr.Markdown(f"**Column {i + 1}: {preset['title']}**")
                            en = gr.Checkbox(value=preset["enabled"], label="enabled")
                            pol = gr.Dropdown(POLICY_CHOICES, value=preset["policy"], label="policy")
                            th = gr.Slider(-1.0, 1.0, value=preset["threshold"], step=0.01, label="threshold")
                            dp = gr.Slider(1, top, value=min(preset["depth"] or loops, loops), step=1,
                                           label="fixed depth")
                            col_inputs += [en, pol, th, dp]
                            col_texts.append(gr.HighlightedText(color_map=render.colour_map(loops), show_legend=False,
                                                                show_inline_category=False, label="answer",
                                                                elem_classes=["cmp-text"]))
                            col_counters.append(gr.HTML(""))
                    with gr.Column(min_width=220):
                        gr.Markdown("**The teacher** (SmolLM2-135M-Instruct, no sharing)")
                        teacher_en = gr.Checkbox(value=False, label="enabled", elem_id="cmp-teacher",
                                                 info="its greedy answer, and how often it would have said each "
                                                      "token of the full-depth answer")
                        teacher_text = gr.HighlightedText(color_map=render.colour_map(1), show_legend=False,
                                                          show_inline_category=False, label="teacher's answer",
                                                          elem_classes=["cmp-text"], elem_id="cmp-teacher-text")
                        teacher_counts = gr.HTML("", elem_id="cmp-teacher-quality")
                cmp_plot = gr.Plot(plots.compare_chart([]), elem_id="cmp-plot")
                cmp_status = gr.Markdown("")
            # ---------------------------------------------------------------- Sweep
            with gr.Tab("Sweep", id="sweep"):
                gr.Markdown("Teacher-forced on a text: every threshold of a policy replayed on the same per-loop "
                            "signals. The dotted line is static truncation at each depth — an adaptive policy is "
                            "worth having where its curve lies above it. ★ marks the Live tab's current setting.")
                with gr.Row():
                    sw_text = gr.Textbox(value=_sweep_text(), lines=5, label="Text", scale=3, elem_id="sweep-text")
                    with gr.Column(scale=1):
                        sw_policy = gr.Dropdown(["confidence", "saturation", "halting", "router"], value="confidence",
                                                label="Policy to sweep", info="router: its logit bias is swept")
                        sw_measure = gr.Dropdown(["max_prob", "top2_gap", "entropy"], value="max_prob",
                                                 label="Confidence measure")
                        sw_btn = gr.Button("Sweep", variant="primary", elem_id="sweep-run")
                with gr.Row():
                    sw_plot = gr.Plot(plots.sweep_chart(None), elem_id="sweep-plot")
                    sw_ppl = gr.Plot(plots.sweep_chart(None, "perplexity"), elem_id="sweep-ppl")
                sw_status = gr.Markdown("")
            # ---------------------------------------------------------------- Batching lab
            with gr.Tab("Batching lab", id="batching"):
                gr.Markdown("One workload of chat prompts, run by the **same engine** under each batching strategy. "
                            "Each row is a request, each column one call of the shared block; the colour is the loop "
                            "the request ran in that call (pale = waiting for the batch, grey = prompt chunk). "
                            "Depth policy and KV mode: the Live tab's settings.")
                with gr.Row():
                    lab_requests = gr.Slider(2, 16, value=6, step=1, label="Requests")
                    lab_new = gr.Slider(2, 48, value=12, step=1, label="Max new tokens (each request 50-100%)")
                    lab_rate = gr.Slider(0, 8, value=0, step=0.5, label="Arrival rate (req/s, 0 = all at once)")
                    lab_strategies = gr.CheckboxGroup(["static", "csb", "ee_sequence", "cdb"],
                                                      value=["static", "csb", "ee_sequence", "cdb"], label="Strategies",
                                                      info="static · continuous sequence (csb) · early exit under "
                                                           "sequence batching · continuous depth-wise (cdb)")
                    lab_btn = gr.Button("Run workload", variant="primary", elem_id="lab-run")
                lab_table = gr.Dataframe(headers=["strategy", "tok/s", "× static", "req/s", "TTFT p50 ms",
                                                  "TTFT p95 ms", "per-token p50 ms", "avg depth", "block calls",
                                                  "items/call", "overhead", "agreement w/ full"],
                                         interactive=False, elem_id="lab-table")
                lab_plots = [gr.Plot(elem_id=f"lab-gantt-{i}") for i in range(4)]
                lab_status = gr.Markdown("")
            # ---------------------------------------------------------------- Model
            with gr.Tab("Model", id="model"):
                with gr.Row():
                    picker = gr.Dropdown(service.choices(), value=loaded.label, label="Model or checkpoint",
                                         allow_custom_value=True, scale=4)
                    load_btn = gr.Button("Load", scale=1, elem_id="load-model")
                card = gr.HTML(render.model_card(loaded.description, loaded.note), elem_id="model-card")
                diagram = gr.HTML(render.layout_diagram(loaded.description), elem_id="layout")
            # ---------------------------------------------------------------- Convert
            converter = service.converter()
            with gr.Tab("Convert", id="convert"):
                gr.Markdown("Bring your own model: convert a pretrained Llama-family model into a recursive one "
                            "(shared layers looped, a LoRA per position initialised by truncated SVD of "
                            "W_orig − W_shared, plain or activation-aware) and see what the conversion keeps: "
                            "parameters, the layer map, the "
                            "reconstruction error of every projection, the energy a LoRA rank captures, and "
                            "perplexity / agreement with the base on a short held-out text.")
                with gr.Row():
                    cv_base = gr.Dropdown(converter.base_choices(), value=converter.base_choices()[0],
                                          label="Base model", allow_custom_value=True, scale=3, elem_id="cv-base",
                                          info="the embedded SmolLM2, or a Llama checkpoint folder under the "
                                               "checkpoint roots" + (", or a Hub id" if hub_allowed() else ""))
                    cv_loops = gr.Slider(1, 8, value=3, step=1, label="Loops", elem_id="cv-loops")
                    cv_rank = gr.Dropdown(["0", "8", "16", "32", "64", "128", "full"], value="64",
                                          allow_custom_value=True, label="LoRA rank", elem_id="cv-rank")
                with gr.Row():
                    cv_sharing = gr.Radio(list(CONVERT_SHARING), value="cycle", label="Sharing scheme")
                    cv_init = gr.Radio(list(CONVERT_INIT), value="average", label="Shared-block init")
                    cv_lora_init = gr.Radio(list(CONVERT_LORA_INIT), value="svd", label="LoRA init", elem_id="cv-lora-init",
                                            info="asvd: activation-aware, calibrated on 4k tokens of the teacher's "
                                                 "committed chat answers")
                    cv_btn = gr.Button("Convert", variant="primary", elem_id="cv-run", scale=0)
                    cv_cancel = gr.Button("Cancel", elem_id="cv-cancel", scale=0)
                cv_status = gr.Markdown("", elem_id="cv-status")
                with gr.Row():
                    cv_report = gr.HTML(render.conversion_report(None), elem_id="cv-report")
                    cv_layers = gr.HTML("", elem_id="cv-layers")
                with gr.Row():
                    cv_error = gr.Plot(plots.reconstruction_heatmap(None), elem_id="cv-error")
                    cv_energy = gr.Plot(plots.energy_vs_rank(None), elem_id="cv-energy")
                with gr.Row():
                    cv_name = gr.Textbox(value="my-conversion", label="Checkpoint name", scale=3, elem_id="cv-name",
                                         info=f"saved under {converter.save_root}")
                    cv_save = gr.Button("Save checkpoint", elem_id="cv-save", scale=0)
                    cv_open = gr.Button("Open in Live", elem_id="cv-open", scale=0, interactive=False)
                cv_saved = gr.State(None)
                with gr.Accordion("Report (JSON)", open=False):
                    cv_json = gr.JSON(elem_id="cv-json")

        # ================================================================ events
        live_inputs = [prompt, chat, policy, threshold, depth, measure, max_loops, kv_mode, max_new,
                       temperature, top_p, rep_pen, seed, time_full, shared, ghost]
        live_outputs = [tokens, counters, depth_plot, heatmap, compute_plot, kv_plot, hist_plot, trace_state, trace_file,
                        status, details, share_file, ghost_line, time_plot]

        @gpu
        @user_errors
        def run_live(prompt_v, chat_v, policy_v, threshold_v, depth_v, measure_v, max_loops_v, kv_v, max_new_v,
                     temp_v, top_p_v, rep_v, seed_v, time_full_v, shared_v=True, ghost_v=False):
            settings = Settings(policy_v, threshold_v, depth_v, measure_v, max_loops_v, kv_v, max_new_v, temp_v,
                                top_p_v, rep_v, seed_v if seed_v is not None else 0, chat_v)
            settings = settings.validated(service.current.num_loops)
            text, notice = service.prepare_prompt(prompt_v, chat_v)
            if notice:
                gr.Warning(notice)
            use_engine = bool(shared_v)
            with (contextlib.nullcontext() if use_engine else service.lock):
                s = start_shared(service, text, settings) if use_engine else service.start(text, settings)
                last_plot = 0.0
                try:
                    for step in s:
                        now = time.monotonic()
                        figs = (gr.skip(),) * 5
                        if now - last_plot > PLOT_EVERY_S:
                            figs, last_plot = _figures(s.trace), now
                        yield (render.highlighted(s.trace), render.counters(s.trace, running=True), *figs,
                               gr.skip(), gr.skip(), f"Generating… {len(s.trace.steps)} tokens", gr.skip(), gr.skip(),
                               gr.skip(), gr.skip())
                finally:
                    s.close()
                    service.last_finish_reason = s.trace.finish_reason
                trace = s.trace
                speedup = None
                if time_full_v:
                    yield (gr.skip(), gr.skip(), *_figures(trace), gr.skip(), gr.skip(),
                           "Timing the same prompt at full depth…", gr.skip(), gr.skip(), gr.skip(), gr.skip())
                    full_settings = service.full_depth_settings(settings)
                    full = (start_shared(service, text, full_settings, inspect=False) if use_engine
                            else service.start(text, full_settings, inspect=False))
                    for _ in full:
                        pass
                    adaptive_wall, full_wall = trace.totals()["wall_s"], full.trace.totals()["wall_s"]
                    speedup = full_wall / adaptive_wall if adaptive_wall else None
                    trace.notes.append(f"full-depth run of the same prompt: {full_wall:.2f} s "
                                       f"({len(full.trace.steps)} tokens)")
                trace.settings["wall_clock_speedup"] = speedup
            done = f"Done: {len(trace.steps)} tokens, finish reason **{trace.finish_reason}**."
            if trace.notes:
                done += " " + " ".join(f"_{n}_" for n in trace.notes)
            share = _write_download("share", share_dict(prompt_v, settings, service.current.label))
            ghost_html = ""
            if ghost_v:
                with service.lock:
                    answer = service.teacher_answer(text, settings.max_new_tokens, settings.repetition_penalty)
                    agree = service.teacher_agreement(text, [st.token_id for st in trace.steps])
                ghost_html = render.ghost_line(answer.text, agree)
            yield (render.highlighted(trace), render.counters(trace, speedup), *_figures(trace), trace.to_dict(),
                   _write_trace(trace), done, render.token_details(trace, None), share, ghost_html,
                   plots.time_breakdown(trace))

        def _figures(trace):
            return (plots.depth_per_token(trace), plots.signal_heatmap(trace), plots.cumulative_compute(trace),
                    plots.kv_view(trace), plots.signal_histograms(trace))

        # Live runs share the batching engine's steps, so several users may stream at once; the
        # solo path (other policies) serialises on service.lock inside the handler.
        run_btn.click(run_live, live_inputs, live_outputs, api_name="generate", concurrency_id="live",
                      concurrency_limit=8)
        prompt.submit(run_live, live_inputs, live_outputs, api_name="generate_submit", concurrency_id="live",
                      concurrency_limit=8)

        @user_errors
        def show_token(trace_dict, evt: gr.SelectData):
            trace = GenerationTrace.from_dict(trace_dict) if trace_dict else None
            index = evt.index if isinstance(evt.index, int) else (evt.index[0] if evt.index else None)
            return render.token_details(trace, index)

        tokens.select(show_token, [trace_state], [details], api_name="token_details")

        @user_errors
        def threshold_lab_event(policy_v, threshold_v, measure_v, trace_dict):
            if policy_v != "adaptive":
                raise ServiceError("The threshold lab is for the adaptive policy: pick it above and run it first.")
            view = service.threshold_view(Settings(policy=policy_v, threshold=threshold_v, measure=measure_v))
            if view is None:
                raise ServiceError("Run the adaptive policy at least once (sync KV) to collect calibration pairs.")
            trace = GenerationTrace.from_dict(trace_dict) if trace_dict else None
            fitted = "fitted" if view["fitted"] else "not fitted yet (each component needs 2 pairs; refit per sequence)"
            note = (f"{len(view['consistent'])} consistent and {len(view['inconsistent'])} inconsistent pairs; "
                    f"mixture {fitted}; threshold **{view['threshold']:.2f}** after {view['updates']} updates.")
            return plots.threshold_lab(view, trace), note

        thr_btn.click(threshold_lab_event, [policy, threshold, measure, trace_state], [thr_plot, thr_note],
                      api_name="threshold_lab")

        @user_errors
        def replay(path):
            """Every Live view rebuilt from a trace file alone."""
            trace = load_trace(path)
            depth = max([s.max_depth for s in trace.steps] or [trace.model.get("num_loops", 1)])
            note = f"Replayed a trace of **{trace.model.get('name', 'a model')}**: {len(trace.steps)} tokens."
            return (gr.update(value=render.highlighted(trace), color_map=render.colour_map(depth)),
                    render.counters(trace), *_figures(trace), trace.to_dict(), note, render.token_details(trace, None),
                    render.legend_html(depth), plots.time_breakdown(trace), "", None, None)  # no ghost line, no files

        @user_errors
        def load_share(path):
            """A share file's prompt and settings into the Live inputs (the model is named, not loaded)."""
            prompt_s, st, model_label = from_share(load_share_file(path))
            note = f"Loaded the settings of a run of **{model_label}**."
            if model_label != service.current.label:
                note += " This page has another model loaded: pick that one in the Model tab to reproduce the run."
            return (prompt_s, st.chat, st.policy, st.threshold, st.depth, st.measure, st.max_loops, st.kv_mode,
                    st.max_new_tokens, st.temperature, st.top_p, st.repetition_penalty, st.seed, note)

        share_btn.click(load_share, [share_in],
                        [prompt, chat, policy, threshold, depth, measure, max_loops, kv_mode, max_new, temperature,
                         top_p, rep_pen, seed, status], api_name="load_share")

        replay_btn.click(replay, [replay_file],
                         [tokens, counters, depth_plot, heatmap, compute_plot, kv_plot, hist_plot, trace_state, status,
                          details, legend, time_plot, ghost_line, trace_file, share_file], api_name="replay_trace")

        @gpu
        @user_errors
        def run_compare(prompt_v, max_new_v, *cols_and_teacher):
            *cols, teacher_v = cols_and_teacher  # four inputs per column, then the teacher's checkbox
            text, notice = service.prepare_prompt(prompt_v, True)
            if notice:
                gr.Warning(notice)
            nloops = service.current.num_loops
            columns = []
            for i in range(len(COMPARE_PRESETS)):
                en, pol, th, dp = cols[4 * i: 4 * i + 4]
                if en:
                    columns.append((i, Settings(pol, th, dp, "max_prob", nloops, "sync", max_new_v,
                                                0.0, 1.0, 1.1, 0, True).validated(nloops)))
            if len(columns) < 2:
                raise ServiceError("Enable at least two columns to compare.")
            texts, counts = [gr.skip()] * len(COMPARE_PRESETS), [gr.skip()] * len(COMPARE_PRESETS)
            for i in range(len(COMPARE_PRESETS)):
                if i not in [c[0] for c in columns]:
                    texts[i], counts[i] = [], "<i>disabled</i>"
            points = []
            with service.lock:
                reference = service.start(text, Settings(policy="fixed", depth=nloops, max_loops=nloops,
                                                         max_new_tokens=int(max_new_v)).validated(nloops), inspect=False)
                for _ in reference:
                    pass
                ref_ids = [s.token_id for s in reference.trace.steps]
                if not ref_ids:
                    raise ServiceError("The full-depth answer is empty (the model stopped at once); try another prompt.")
                for i, settings in columns:
                    s = service.start(text, settings, inspect=False)
                    for _ in s:
                        pass
                    quality = service.agreement_with(text, True, ref_ids, settings)
                    got = [st.token_id for st in s.trace.steps]
                    same = sum(a == b for a, b in zip(got, ref_ids)) / len(ref_ids)
                    points.append({**quality, "label": f"{i + 1}: {settings.label()}"})
                    texts[i] = render.highlighted(s.trace)
                    counts[i] = (render.counters(s.trace) +
                                 f"<div class='quality'>teacher-forced agreement <b>{quality['agreement']:.2f}</b>"
                                 f" at {100 - quality['saved_pct']:.0f}% compute · generated tokens equal to "
                                 f"full depth: {same:.2f}</div>")
                    yield (*texts, *counts, plots.compare_chart(points), f"Ran {len(points)}/{len(columns)} columns…",
                           gr.skip(), gr.skip())
                teacher_view, teacher_note = [], "<i>disabled</i>"
                if teacher_v:
                    yield (*texts, *counts, plots.compare_chart(points), "Running the teacher…", gr.skip(), gr.skip())
                    answer = service.teacher_answer(text, int(max_new_v))
                    agree = service.teacher_agreement(text, ref_ids)
                    got = [st.token_id for st in answer.steps]
                    same = sum(a == b for a, b in zip(got, ref_ids)) / len(ref_ids)
                    teacher_view = render.highlighted(answer)
                    teacher_note = (f"<div class='quality'>the teacher's top-1 choice for <b>{agree:.2f}</b> of the "
                                    f"full-depth answer's tokens (teacher-forced) · its own answer equal to the "
                                    f"full-depth one token for token: {same:.2f}</div>")
            yield (*texts, *counts, plots.compare_chart(points), "Done.", teacher_view, teacher_note)

        cmp_btn.click(run_compare, [cmp_prompt, cmp_new, *col_inputs, teacher_en],
                      [*col_texts, *col_counters, cmp_plot, cmp_status, teacher_text, teacher_counts],
                      api_name="compare", concurrency_id="model", concurrency_limit=1)

        @gpu
        @user_errors
        def run_sweep(text_v, policy_v, measure_v, live_policy, live_threshold, live_depth, live_measure, live_max_loops):
            nloops = service.current.num_loops
            current = Settings(live_policy, live_threshold, live_depth, live_measure, live_max_loops).validated(nloops)
            with service.lock:
                result = service.sweep(text_v, policy_v, measure_v, current)
            msg = (f"{result['tokens']} tokens teacher-forced; {len(result['family'])} thresholds of "
                   f"{policy_v}; current setting: {result['current']['label']} → agreement "
                   f"{result['current']['agreement']:.2f}, perplexity {result['current']['perplexity']:.1f}, "
                   f"{100 - result['current']['saved_pct']:.0f}% compute.")
            return plots.sweep_chart(result), plots.sweep_chart(result, "perplexity"), msg

        sw_btn.click(run_sweep, [sw_text, sw_policy, sw_measure, policy, threshold, depth, measure, max_loops],
                     [sw_plot, sw_ppl, sw_status], api_name="sweep", concurrency_id="model", concurrency_limit=1)

        @gpu
        @user_errors
        def run_lab(n_v, new_v, rate_v, strategies_v, live_policy, live_threshold, live_depth, live_measure,
                    live_max_loops, live_kv):
            nloops = service.current.num_loops
            settings = Settings(live_policy, live_threshold, live_depth, live_measure, live_max_loops,
                                live_kv).validated(nloops)
            order = [s for s in ("static", "csb", "ee_sequence", "cdb") if s in (strategies_v or [])]
            with service.lock:
                runs = batching_lab(service, int(n_v), int(new_v), float(rate_v), order, settings, _examples())
            rows, figs = [], []
            for name in order:
                m = runs[name]["metrics"]
                fmt = lambda v, f="{:.1f}": "—" if v is None else f.format(v)
                rows.append([name, fmt(m["tokens_per_s"]), fmt(m.get("speedup_vs_static"), "×{:.2f}"),
                             fmt(m["requests_per_s"], "{:.2f}"), fmt(m["ttft_p50_ms"], "{:.0f}"),
                             fmt(m["ttft_p95_ms"], "{:.0f}"), fmt(m["tpot_p50_ms"], "{:.0f}"),
                             fmt(m["avg_depth"], "{:.2f}"), m["block_calls"], fmt(m["mean_items_per_call"]),
                             fmt(m["overhead_share"] * 100, "{:.0f}%"),
                             fmt(m.get("agreement_with_full_depth"), "{:.2f}")])
                figs.append(plots.gantt(runs[name], nloops))
            figs += [None] * (4 - len(figs))
            msg = (f"{int(n_v)} requests, policy **{settings.label()}**, KV {settings.kv_mode}. Measured on this "
                   "machine, one engine, one run; agreement = generated tokens equal to the full-depth strategy's.")
            return rows, *figs, msg

        lab_btn.click(run_lab, [lab_requests, lab_new, lab_rate, lab_strategies, policy, threshold, depth, measure,
                                max_loops, kv_mode], [lab_table, *lab_plots, lab_status], api_name="batching_lab",
                      concurrency_id="model", concurrency_limit=1)

        @user_errors
        def load_model_event(label):
            with service.lock:
                loaded_now = service.load(label)
            n = loaded_now.num_loops
            cmap = render.colour_map(n)
            return (render.model_card(loaded_now.description, loaded_now.note),
                    render.layout_diagram(loaded_now.description),
                    f"**Loaded:** {loaded_now.label}. {loaded_now.note}", render.legend_html(n),
                    gr.update(color_map=cmap, value=[]), gr.update(maximum=loop_slider_max(n), value=1),
                    gr.update(maximum=loop_slider_max(n), value=n),
                    gr.update(choices=service.choices(), value=loaded_now.label))

        load_btn.click(load_model_event, [picker],
                       [card, diagram, model_note, legend, tokens, depth, max_loops, picker],
                       api_name="load_model", concurrency_id="model", concurrency_limit=1)

        @gpu
        @user_errors
        def run_convert(base_v, loops_v, sharing_v, init_v, rank_v, lora_init_v="svd", progress=gr.Progress()):
            options = ConvertOptions.parse(loops_v, sharing_v, init_v, rank_v, lora_init_v)
            yield (gr.skip(),) * 5 + (f"Converting **{base_v}**…",)
            for fraction, message in converter.convert(base_v, options):
                progress(fraction, desc=message)
                yield (gr.skip(),) * 5 + (message,)  # a step boundary: Cancel stops the work here
            report = converter.last[2]
            held = report.get("held_out") or {}
            msg = (f"Converted **{base_v}**: {report['config']['positions']} positions, "
                   f"{report['params']['unique'] / 1e6:.2f} M unique parameters"
                   + (f"; held-out perplexity {held['base_ppl']:.2f} → {held['ppl']:.2f}, agreement "
                      f"{held['agreement']:.3f}" if held else "") + ". Save it to open it in Live.")
            yield (render.conversion_report(report), render.layer_map_table(report),
                   plots.reconstruction_heatmap(report), plots.energy_vs_rank(report), report, msg)

        convert_event = cv_btn.click(run_convert, [cv_base, cv_loops, cv_sharing, cv_init, cv_rank, cv_lora_init],
                                     [cv_report, cv_layers, cv_error, cv_energy, cv_json, cv_status],
                                     api_name="convert", concurrency_id="model", concurrency_limit=1)
        cv_cancel.click(lambda: "Conversion cancelled.", None, [cv_status], cancels=[convert_event],
                        api_name="convert_cancel")

        @user_errors
        def save_conversion(name_v):
            folder = converter.save(name_v)
            return (f"Saved to `{folder}`: pick it in the Model tab or press **Open in Live**.", str(folder),
                    gr.update(interactive=True), gr.update(choices=service.choices()))

        cv_save.click(save_conversion, [cv_name], [cv_status, cv_saved, cv_open, picker], api_name="convert_save",
                      concurrency_id="model", concurrency_limit=1)

        @user_errors
        def open_in_live(saved):
            if not saved:
                raise ServiceError("Save the conversion first.")
            return (*load_model_event(saved), gr.Tabs(selected="live"))

        cv_open.click(open_in_live, [cv_saved], [card, diagram, model_note, legend, tokens, depth, max_loops, picker,
                                                 tabs], api_name="convert_open", concurrency_id="model",
                      concurrency_limit=1)
    return demo


def css() -> str:
    path = Path(ASSETS_DIR) / "style.css"
    return path.read_text() if path.exists() else ""
