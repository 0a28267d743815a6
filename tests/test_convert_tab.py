"""The Convert tab over HTTP (gradio_client): convert a tiny base, check the numbers, save, open in Live."""
from __future__ import annotations

import pytest
from gradio_client import Client

from dashboard.service import ModelService
from model import load_model, recursify
from tests.conftest import tiny_llama
from tests.dashboard_helpers import launch


@pytest.fixture(scope="module")
def app(smol_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    rec = recursify(tiny_llama(vocab=len(smol_tokenizer)), num_loops=3, lora_rank=4)
    service = ModelService.from_model(rec, smol_tokenizer, "tiny random recursive model")
    service.checkpoint_roots = [root]
    service.converter().add_base("tiny base", tiny_llama(layers=6, vocab=len(smol_tokenizer)), smol_tokenizer)
    demo, url = launch(service)
    yield service, Client(url, verbose=False), root
    demo.close()


def test_convert_returns_the_report(app):
    service, client, _ = app
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert {"/convert", "/convert_save", "/convert_open", "/convert_cancel"} <= names
    report_html, layers_html, _, _, report, status = client.predict("tiny base", 3, "cycle", "average", "full",
                                                                    api_name="/convert")
    assert report["config"]["positions"] == 6 and report["config"]["lora_rank"] == "full"
    assert report["summary"]["max_error"] < 1e-4
    assert report["held_out"]["agreement"] == 1.0
    assert report["params"]["unique"] == sum(p.numel() for p in service.converter().last[0].parameters())
    assert "held-out perplexity" in report_html and "Layer map table" in layers_html and "Converted" in status
    _, _, _, _, low, _ = client.predict("tiny base", 2, "middle_cycle", "lower", "4", api_name="/convert")
    assert low["layer_map"][0]["role"] == "prelude" and low["summary"]["max_error"] > 0.01
    assert low["held_out"]["agreement"] < 1.0


def test_activation_aware_init_over_http(app):
    _, client, _ = app
    report_html, *_, report, status = client.predict("tiny base", 3, "cycle", "average", "4", "asvd",
                                                     api_name="/convert")
    assert report["config"]["lora_init"] == "asvd" and "activation-aware" in report_html
    assert set(report["summary"]["mean_output_error"]) == set(report["projections"])
    assert "outputs</i> on the calibration text" in report_html and "Converted" in status


@pytest.mark.parametrize("args,message", [
    (("tiny base", 3, "cycle", "average", "lots"), "LoRA rank"),
    (("tiny base", 3, "cycle", "average", "4", "pca"), "not in the list of choices"),  # gradio checks the Radio
    (("HuggingFaceTB/SmolLM2-135M", 2, "cycle", "average", "4"), "Hub ids only where the Hub is reachable"),
    (("tiny base", 7, "cycle", "average", "4"), "Cannot convert"),
    (("/etc", 2, "cycle", "average", "4"), "not available here"),
])
def test_bad_settings_give_a_clear_message(app, args, message):
    _, client, _ = app
    with pytest.raises(Exception, match=message):
        client.predict(*args, api_name="/convert")


def test_a_llama_folder_under_the_roots_converts(app, smol_tokenizer):
    service, client, root = app
    folder = root / "my-llama"
    tiny_llama(layers=4, vocab=len(smol_tokenizer), seed=3).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    assert str(folder) in service.converter().base_choices()
    *_, report, status = client.predict(str(folder), 2, "cycle", "average", "full", api_name="/convert")
    assert report["config"]["base_layers"] == 4 and report["held_out"]["agreement"] == 1.0
    assert str(folder) in status


def test_save_and_open_in_live(app):
    service, client, root = app
    client.predict("tiny base", 2, "cycle", "average", "8", api_name="/convert")
    with pytest.raises(Exception, match="name of letters"):
        client.predict("../escape", api_name="/convert_save")
    result = client.predict("tiny-conv", api_name="/convert_save")  # the State is not part of the API
    status, picker = result[0], result[-1]
    folder = root / "converted" / "tiny-conv"
    assert str(folder) in status and (folder / "config.json").exists()
    assert str(folder) in [c[0] if isinstance(c, (list, tuple)) else c for c in picker["choices"]]
    model, _ = load_model(folder)
    assert model.config.num_loops == 2 and model.config.lora_rank == 8
    client.predict(str(folder), api_name="/convert_open")
    assert service.current.label == str(folder) and service.current.num_loops == 2


def test_figures_and_html_from_a_report():
    from dashboard import plots, render
    from model.conversion.analysis import analyse

    base = tiny_llama(layers=6)
    report = analyse(base, recursify(base, num_loops=3, lora_rank=8))
    heat = plots.reconstruction_heatmap(report)
    assert len(heat.data[0].z) == 6 and list(heat.data[0].x) == list(report["projections"])
    energy = plots.energy_vs_rank(report)
    assert [t.name for t in energy.data][:7] == list(report["projections"])
    assert energy.data[-1].name == "chosen rank 8" and list(energy.data[-1].x) == [8, 8]
    assert list(energy.data[0].y) == report["summary"]["mean_energy"]["q_proj"]
    text = render.conversion_report(report)
    assert f"{report['params']['unique'] / 1e6:.2f} M" in text and "held-out" not in text  # no tokenizer: no check
    assert render.layer_map_table(report).count("<tr>") == 7  # header + 6 positions


def test_options_refuse_an_unknown_lora_init():
    from dashboard.service import ConvertOptions, ServiceError

    assert ConvertOptions.parse(2, "cycle", "average", "8", "asvd").lora_init == "asvd"
    with pytest.raises(ServiceError, match="LoRA init must be one of svd, asvd"):
        ConvertOptions.parse(2, "cycle", "average", "8", "pca")


@pytest.mark.timeout(1800)  # a 30-layer conversion with calibration on a loaded 2-core machine
def test_the_embedded_model_converts_saves_and_runs_in_live(app):
    """The issue's flow on the real embedded SmolLM2: convert (activation-aware LoRA), save, open in Live, generate."""
    import json

    from model.inference.trace import GenerationTrace
    from tests.dashboard_helpers import live_args

    service, client, root = app
    report_html, *_, report, status = client.predict("smollm2-135m", 2, "middle_cycle", "average", "64", "asvd",
                                                     api_name="/convert")
    c, held = report["config"], report["held_out"]
    assert (c["base_layers"], c["positions"], c["block_size"], c["lora_init"]) == (30, 30, 14, "asvd")
    assert report["params"]["unique"] < report["params"]["base"]  # shares weights for real
    assert held["base_ppl"] < held["ppl"] and 0.0 < held["agreement"] < 1.0  # rank 64 loses something, not all
    assert "smollm2-135m" in status and "activation-aware" in report_html
    client.predict("smol-asvd", api_name="/convert_save")
    folder = root / "converted" / "smol-asvd"
    client.predict(str(folder), api_name="/convert_open")
    assert service.current.label == str(folder) and service.current.num_loops == 2
    result = client.predict(*live_args(prompt_v="What is the capital of France?", policy_v="fixed", depth_v=2,
                                       max_loops_v=2, max_new_v=6), api_name="/generate")
    trace = GenerationTrace.from_dict(json.load(open(result[7])))
    assert len(trace.steps) >= 1 and {s.depth for s in trace.steps} == {2} and "finish reason" in result[8]
    assert trace.model["num_loops"] == 2


def test_the_heatmap_shows_output_errors_for_the_activation_aware_init(smol_tokenizer):
    from dashboard import plots
    from model.conversion.analysis import convert_steps
    from model.data.answer_store import calibration_texts

    base = tiny_llama(layers=4, vocab=len(smol_tokenizer), seed=2)
    *_, (_, _, (_, report)) = list(convert_steps(base, smol_tokenizer, num_loops=2, lora_rank=4, lora_init="asvd",
                                                 calibration_texts=calibration_texts(smol_tokenizer, count=16)))
    heat = plots.reconstruction_heatmap(report)
    assert heat.data[0].z[0][0] == report["positions"][0]["output_error"][report["projections"][0]]
    assert "output error" in heat.layout.title.text
