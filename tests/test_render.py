"""Dashboard HTML that needs no server: the Model tab's training provenance."""
from __future__ import annotations

from pathlib import Path


def test_model_card_shows_the_committed_defaults_training_stages():
    import json

    from dashboard.render import model_card

    training = json.loads((Path(__file__).resolve().parent.parent / "assets/default/config.json").read_text())["training"]
    card = model_card({"training": training, "parameters": {}})
    for stage in training["stages"]:
        assert f"<td>{stage['stage']}</td><td>{stage['tokens_seen']:,}</td>" in card
        assert stage["commands"][0].split(" --out")[0] in card  # commands are shown (escaped text equals here)
    assert f"{training['artifact']['ppl_rebuilt']:.2f}" in card
