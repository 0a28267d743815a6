"""``python -m model.serving``: the OpenAI-compatible server (``model.serving.server``)."""
from model.serving.server import main

main()
