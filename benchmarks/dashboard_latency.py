"""How long the dashboard takes to be ready, and from a click to the first streamed token.

    .venv/bin/python benchmarks/dashboard_latency.py                 # the default model, 5 clicks
    .venv/bin/python benchmarks/dashboard_latency.py --runs 8 --json .cache/runs/latency.json

Starts ``app.py`` (the trained default, warm cache) in a subprocess on a loopback port and measures
the seconds until the page answers; then submits the Live tab's ``/generate`` with its opening
settings through ``gradio_client`` and times the first streamed update (the first token on the page)
and the whole answer, ``--runs`` times. Say in the report whether other jobs shared the CPU. Not a
test: nothing passes or fails.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--prompt", default="What is the capital of France, and why is it famous?")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        while time.perf_counter() - t0 < 300:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        ready_s = time.perf_counter() - t0
        from gradio_client import Client

        client = Client(url, verbose=False)
        info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]["parameters"]
        defaults = {q["parameter_name"]: q["parameter_default"] for q in info}
        defaults["prompt_v"] = args.prompt
        first, total = [], []
        for _ in range(args.runs):
            start = time.perf_counter()
            job = client.submit(*defaults.values(), api_name="/generate")
            while not job.outputs() and not job.done():
                time.sleep(0.01)
            first.append(time.perf_counter() - start)
            job.result()
            total.append(time.perf_counter() - start)
        result = {"ready_s": ready_s, "first_token_s": first, "answer_s": total,
                  "first_token_median_s": statistics.median(first), "answer_median_s": statistics.median(total),
                  "settings": {k: v for k, v in defaults.items() if k != "prompt_v"}}
        print(json.dumps(result, indent=1))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
