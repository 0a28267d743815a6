"""``python -m model.serving``: the OpenAI-compatible server (``model.serving.server``)."""
from .server import main

main()
