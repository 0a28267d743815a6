"""Serve the Adaptive-Depth Lab dashboard: ``python app.py [--host H] [--port P] [--share] [--model M]``.

Locally it listens on 127.0.0.1:7860; on Hugging Face Spaces (``SPACE_ID`` set) on 0.0.0.0 and the
port Spaces gives. It loads the best available model once at start-up: the trained default if it
can be built, else an untrained conversion of the embedded SmolLM2 (the page says which).
"""
from __future__ import annotations

import argparse
import logging
import os

from pathlib import Path

from dashboard.app import build_app, launch_options
from dashboard.service import ModelService, default_checkpoint_roots, local_checkpoints_allowed

def parse_args(argv=None) -> argparse.Namespace:
    on_spaces = bool(os.environ.get("SPACE_ID"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="0.0.0.0" if on_spaces else "127.0.0.1")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", os.environ.get("GRADIO_SERVER_PORT", 7860))))
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--model", default=None, help="model label or checkpoint folder to load first (on Spaces a "
                   "folder also needs --allow-local-checkpoints)")
    p.add_argument("--checkpoint-root", action="append", default=[], type=Path, metavar="FOLDER",
                   help="also let visitors load checkpoint folders under FOLDER (repeatable; runs/ and the "
                        "cache's runs/ always count)")
    p.add_argument("--allow-local-checkpoints", action="store_true",
                   help="on Spaces, let visitors load checkpoint folders under the roots (off by default there)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    allow = args.allow_local_checkpoints or local_checkpoints_allowed()
    roots = [*default_checkpoint_roots(), *args.checkpoint_root]
    if args.model and Path(args.model).is_dir():  # the folder the operator named is a root of its own
        roots.append(Path(args.model))
    service = ModelService(checkpoint_roots=roots, allow_local=allow)
    loaded = service.load(args.model) if args.model else service.load_best()
    logging.getLogger("app").info("loaded %s", loaded.label)
    demo = build_app(service)
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_options())


if __name__ == "__main__":
    main()
