"""Launch the real Gradio app in-process on a free port (tiny random model unless told otherwise)."""
from __future__ import annotations

import socket

from dashboard.app import build_app, launch_options
from dashboard.service import ModelService


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(service: ModelService):
    """Start the app over HTTP; returns (demo, url). Call ``demo.close()`` when done."""
    demo = build_app(service)
    demo.queue(default_concurrency_limit=1, max_size=32)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options())
    return demo, f"http://127.0.0.1:{port}/"


LIVE_DEFAULTS = dict(prompt_v="Hello there", chat_v=True, policy_v="confidence", threshold_v=0.01, depth_v=1,
                     measure_v="max_prob", max_loops_v=3, kv_v="sync", max_new_v=8, temp_v=0.0, top_p_v=1.0,
                     rep_v=1.1, seed_v=0, time_full_v=False, shared_v=False)


def live_args(**overrides) -> list:
    values = {**LIVE_DEFAULTS, **overrides}
    return list(values.values())
