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


@pytest.mark.parametrize("args,message", [
    (("tiny base", 3, "cycle", "average", "lots"), "LoRA rank"),
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
