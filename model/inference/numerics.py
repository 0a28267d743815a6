"""Per-device numerics: fp32 or bf16, thread count and ``torch.compile``, chosen by measuring this machine.

Machines differ (DESIGN.md): bf16 may be faster or slower than fp32 depending on the CPU's bf16 support and
on the call shape. ``measure`` times the call shapes that matter on the running machine, interleaved so that
load affects every variant alike: one token through one loop of the block with the library's layers (solo
decode), the norm + LM head, one ``BlockRunner`` call of N single-token rows (the serving engine's step) and
one loop over a prompt chunk, each in fp32 and in bf16 (a bf16 copy of the weights: autocast re-casts every
weight on every call, see benchmarks/numerics.py) at 1 thread and at all cores. A path's cost per token
at full depth is ``loops x block + head`` (one head row); bf16 wins only where it is 10 % cheaper (fp32 is
exact, and the timings of a shared machine are noisy) and its next-token argmax mostly agrees with fp32's.
``choose`` caches the result per model and machine in the cache folder: start-up pays it once.

The KV cache holds one dtype (the cache concatenates new keys onto old ones; attention needs q, k, v
alike), so each path runs one dtype for a whole sequence: solo generation (prefill included) the decode
choice, the batching engine bf16 only if bf16 won at every batch shape (its steps range over row counts). ``LAB_NUMERICS``: ``auto`` (default), ``fp32``
(force today's exact fp32 path; the tests set it), ``bf16``. ``LAB_COMPILE=1`` also times a compiled
``BlockRunner`` (~10 s of compiling on the CPU, and not faster there: off by default) and keeps it only
where it wins.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import statistics
import time
import weakref
from dataclasses import asdict, dataclass, field

import torch

from model.paths import cache_dir

log = logging.getLogger(__name__)
ENV, COMPILE_ENV = "LAB_NUMERICS", "LAB_COMPILE"
MODES = ("auto", "fp32", "bf16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
START_THREADS = torch.get_num_threads()  # threads are only changed if nobody has set them since import
_copies: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {dtype: (version, copy)}
_runners: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> compiled BlockRunner
_chosen: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its choice in this process


@dataclass
class NumericsChoice:
    """What runs where: dtype per call shape, threads, compiled or not, and the measured ms behind it."""

    dtypes: dict[str, str]  # shape -> "float32" | "bfloat16": "decode" (solo), "batch<N>", "prefill"
    threads: int
    compiled: bool = False
    ms: dict[str, float] = field(default_factory=dict)  # "<shape>/<dtype>/t<threads>[/compiled]" -> best wall ms
    cpu_ms: dict[str, float] = field(default_factory=dict)  # same keys: median process CPU ms (load-proof at 1 thread)
    machine: dict = field(default_factory=dict)
    source: str = "measured"  # measured | cache | forced
    agreement: float | None = None  # bf16 vs fp32 argmax agreement of next-token logits on a check chunk
    compile_s: float | None = None
    measured_s: float = 0.0
    key: str = ""

    def dtype_for(self, rows: int = 1) -> torch.dtype:
        """Solo decode (1 row), or a batching engine (``rows`` > 1): its steps range over many row counts, so
        it runs bf16 only where bf16 won at every measured batch shape."""
        batches = {d for s, d in self.dtypes.items() if s.startswith("batch")}
        if rows <= 1 or not batches:
            return DTYPES[self.dtypes.get("decode", "float32")]
        return DTYPES["bfloat16" if batches == {"bfloat16"} else "float32"]

    def header(self, dtype: torch.dtype, path: str) -> dict:
        """What a trace records: the dtype this generation ran in and where the choice came from."""
        return {"dtype": str(dtype).removeprefix("torch."), "path": path, "threads": torch.get_num_threads(),
                "compiled": self.compiled, "source": self.source, "choice": dict(self.dtypes),
                "chosen_threads": self.threads, "agreement": self.agreement,
                "machine": self.machine.get("cpu", ""), "device": self.machine.get("device", "cpu")}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NumericsChoice":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def machine_info(device: torch.device) -> dict:
    """The machine as far as speed goes: CPU model and bf16/AMX flags, cores, torch, the GPU."""
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        text = open("/proc/cpuinfo").read()
        cpu = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), cpu)
        have = set(next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), []))
        flags = sorted(f for f in have if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2")))
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu, "flags": flags, "cores": os.cpu_count(), "torch": torch.__version__,
            "device": device.type, "gpu": gpu}


def model_key(model, device: torch.device) -> str:
    """Model (config, size) + machine: the cache key. Weight values do not change the timings."""
    text = json.dumps([model.config.to_json_string(), sum(p.numel() for p in model.parameters()),
                       machine_info(device), os.environ.get(COMPILE_ENV, "")], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_in(model, dtype: torch.dtype):
    """``model`` in ``dtype``: itself, or a copy kept while the original's weights stay unchanged."""
    if model.dtype == dtype:
        return model
    version = sum(p._version for p in model.parameters())
    held = _copies.setdefault(model, {}).get(dtype)
    if held is None or held[0] != version:
        twin = copy.deepcopy(model).to(dtype).eval()
        for mine, theirs in zip(model.modules(), twin.modules()):
            if hasattr(mine, "inv_freq"):  # RoPE frequencies stay fp32 (bf16 would shift far positions)
                theirs.inv_freq = mine.inv_freq.clone()
        held = _copies[model][dtype] = (version, twin)
    return held[1]


def compiled_runner(model):
    """The model's ``BlockRunner`` with the compiled dense parts, one per model (compiled graphs are kept)."""
    from model.serving.runner import BlockRunner  # serving imports inference at its top

    if model not in _runners:
        _runners[model] = BlockRunner(model, compile=True)
    return _runners[model]


def forced(dtype: str = "float32") -> NumericsChoice:
    return NumericsChoice({"decode": dtype, "batch8": dtype}, torch.get_num_threads(), source="forced")


def resolve(model, numerics=None) -> NumericsChoice | None:
    """The choice for an fp32 ``model``: ``numerics`` (a ``NumericsChoice`` or a mode) or ``$LAB_NUMERICS``.
    None when the model is not fp32 (the caller chose its dtype: it runs as given)."""
    if isinstance(numerics, NumericsChoice):
        return numerics
    mode = numerics or os.environ.get(ENV, "auto")
    if mode not in MODES:
        raise ValueError(f"numerics must be one of {MODES} (or ${ENV}), got {mode!r}")
    if model.dtype != torch.float32:
        return None
    if mode != "auto":
        return forced("float32" if mode == "fp32" else "bfloat16")
    choice = _chosen.get(model) or choose(model)
    _chosen[model] = choice
    if torch.get_num_threads() == START_THREADS != choice.threads:  # nobody set threads: take the measured
        torch.set_num_threads(choice.threads)
    return choice


def choose(model, refresh: bool = False, **measure_args) -> NumericsChoice:
    """The cached choice for this model and machine, measured (and cached) if there is none."""
    device = model.model.embed_tokens.weight.device
    key = model_key(model, device)
    path = cache_dir("numerics") / f"{key}.json"
    if path.exists() and not refresh:
        try:
            return NumericsChoice.from_dict({**json.loads(path.read_text()), "source": "cache"})
        except (ValueError, TypeError) as exc:
            log.warning("ignoring unreadable numerics cache %s (%s)", path, exc)
    choice = measure(model, **measure_args)
    choice.key = key
    for dtype in set(_copies.get(model, {})) - {DTYPES[d] for d in choice.dtypes.values()}:
        del _copies[model][dtype]  # a copy no path runs: not kept
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(choice.to_dict(), indent=1))
    tmp.replace(path)
    return choice


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(model, batch_rows: tuple[int, ...] = (8, 32), prefill_tokens: int = 32, context: int = 64,
            reps: int = 3, budget_s: float = 10.0, try_compile: bool | None = None,
            threads: tuple[int, ...] | None = None, screen: bool = True, margin: float = 0.10) -> NumericsChoice:
    """Time every call shape in fp32 and bf16 (and compiled, if asked), interleaved, after a warm-up; thread
    counts are screened on the decode shape first (``screen=False``: every shape at every count)."""
    from model.serving.runner import BlockRunner  # the engine's layer call (serving imports inference)
    from model.inference.decoder import Segment
    from transformers.cache_utils import DynamicCache

    start, device, cfg = time.perf_counter(), model.model.embed_tokens.weight.device, model.config
    try_compile = os.environ.get(COMPILE_ENV) == "1" if try_compile is None else try_compile
    threads = threads or tuple(sorted({1, START_THREADS}))
    block = cfg.loop_positions(1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, context + prefill_tokens), generator=gen).to(device)
    setups, agreement = {}, None
    torch.set_num_threads(threads[0])  # a loaded machine can make extra threads 10x slower
    for name, dtype in DTYPES.items():
        log.info("numerics: %s setup at %.1f s", name, time.perf_counter() - start)
        m = model_in(model, dtype)
        cache = DynamicCache()
        logits = m(input_ids=ids[:, :context], past_key_values=cache, use_cache=True).logits[0]
        if name == "bfloat16":
            ref = setups["float32"]["logits"]
            agreement = float((logits.float().argmax(-1) == ref.argmax(-1)).float().mean())
        runners = {False: BlockRunner(m)}
        if try_compile:
            runners[True] = BlockRunner(m, compile=True)
        setups[name] = {"model": m, "cache": cache, "logits": logits, "runners": runners}

    def call(shape: str, name: str, compiled: bool):
        s = setups[name]
        m, cache, runner = s["model"], s["cache"], s["runners"][compiled]
        if shape == "head":
            x = torch.randn(1, 1, cfg.hidden_size, device=device, dtype=m.dtype)
            return lambda: m.lm_head(m.model.norm(x))
        rows = 1 if shape == "decode" else prefill_tokens if shape == "prefill" else int(shape[5:])
        caches = [cache] if rows == 1 or shape == "prefill" else [_fork(cache, max(block)) for _ in range(rows)]
        x = torch.randn(rows, cfg.hidden_size, device=device, dtype=m.dtype)

        def run():
            if shape == "decode" and not compiled:  # the solo path: the library's decoder layers
                pos = torch.tensor([[context]], device=device)
                m.model.run_positions(x[None], block, m.model.rope(x[None], pos), None, cache)
            elif shape == "prefill":
                segs = [Segment(x, list(range(context, context + rows)), block, cache)]
                runner.run(segs)
            else:
                runner.run([Segment(x[i:i + 1], [context], block, c) for i, c in enumerate(caches)])
            for c in caches:  # back to ``context`` entries: every repetition sees the same cache
                for p in block:
                    c.layers[p].crop(context - c.layers[p].get_seq_length())
        return run

    shapes = ["decode", "head", "prefill"] + [f"batch{n}" for n in batch_rows]
    variants = [(n, t, False) for n in DTYPES for t in threads] + [(n, threads[0], True) for n in DTYPES
                                                                     if try_compile]
    fns = {(s, v): call(s, v[0], v[2]) for s in shapes for v in variants}
    times: dict = {k: [] for k in fns}
    cpu: dict = {k: [] for k in fns}
    compile_s = None
    warm = {(v[0], v[2]): v for v in reversed(variants)}  # warm up (and compile) each dtype once, 1st count
    for v in warm.values():
        t0 = time.perf_counter()
        for s in shapes:
            fns[(s, v)]()
        if v[2]:
            compile_s = (compile_s or 0.0) + time.perf_counter() - t0
    log.info("numerics: warm at %.1f s", time.perf_counter() - start)
    if screen and len(threads) > 1:  # on a loaded machine extra threads can be 10x slower: screen first
        small = ("decode",)
        for rep in range(2):
            for t in (threads if rep % 2 == 0 else threads[::-1]):
                for s in small:
                    times[(s, ("float32", t, False))].append(_timed(fns[(s, ("float32", t, False))], t, device)[0])
        keep = min(threads, key=lambda t: sum(min(times[(s, ("float32", t, False))]) for s in small))
        variants = [v for v in variants if v[1] == keep]
    log.info("numerics: screened at %.1f s", time.perf_counter() - start)
    active = list(variants)
    for rep in range(reps):
        for i in range(len(active)):
            v = active[(i + rep) % len(active)]  # rotate the order: load affects all alike
            for s in shapes:
                wall, cpu_ms = _timed(fns[(s, v)], v[1], device)
                times[(s, v)].append(wall)
                cpu[(s, v)].append(cpu_ms)
        if rep == 0:  # a variant over twice the best time on every shape cannot win: not timed again
            best = {sh: min(times[(sh, v)][-1] for v in active) for sh in shapes}
            active = [v for v in active if any(times[(sh, v)][-1] <= 2 * best[sh] for sh in shapes)]
        if rep >= 1 and time.perf_counter() - start > budget_s:
            break
    torch.set_num_threads(START_THREADS)
    name = lambda s, v: f"{s}/{v[0]}/t{v[1]}{'/compiled' if v[2] else ''}"  # noqa: E731
    cpu_ms = {name(*k): statistics.median(t) for k, t in cpu.items() if t}
    return _decide({name(*k): min(t) for k, t in times.items() if t}, shapes, variants, cfg.num_loops, agreement,
                   compile_s, machine_info(device), time.perf_counter() - start, margin, cpu_ms)


def _fork(cache, last: int):
    """A cache of another request with the same entries (layers ``0..last``), sharing nothing written later."""
    from transformers.cache_utils import DynamicCache

    fork = DynamicCache()
    for p in range(last + 1):
        fork.update(cache.layers[p].keys, cache.layers[p].values, p)
    return fork


def _timed(fn, threads: int, device: torch.device) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one call. Wall is what a user waits; the best of several is the
    estimate (load only adds time); CPU time at 1 thread is what the call cost regardless of load."""
    torch.set_num_threads(threads)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return 1000 * (time.perf_counter() - t0), 1000 * (time.process_time() - c0)


def _decide(ms, shapes, variants, loops, agreement, compile_s, machine, seconds, margin, cpu_ms=None
            ) -> NumericsChoice:
    """Per shape the cheaper dtype at the chosen threads; bf16 (or compiled) only if numerically sane and
    ``margin`` faster per token than fp32 eager; threads and compiled by the geometric mean over shapes.
    On a CPU at 1 thread the dtype is chosen by CPU time (the work a call needs, whatever else runs);
    thread counts are compared by wall time."""
    def key(shape, v):
        return f"{shape}/{v[0]}/t{v[1]}{'/compiled' if v[2] else ''}"

    def per_token(shape, v, clock=ms):  # full depth: loops x block + head (prefill: per chunk)
        cost = clock[key(shape, v)] * (1 if shape == "prefill" else loops) + (0 if shape == "prefill"
                                                                               else clock[key("head", v)])
        return cost if v == ("float32", v[1], False) else cost * (1 + margin)  # fp32 eager: the exact path

    sane = agreement is None or agreement >= 0.75
    usable = [v for v in variants if (v[0] == "float32" or sane) and all(key(s, v) in ms for s in shapes)]
    work = [s for s in shapes if s != "head"]
    best: dict = {}
    for t, c in sorted({(v[1], v[2]) for v in usable}):
        options = [v for v in usable if (v[1], v[2]) == (t, c)]
        by_cpu = t == 1 and machine.get("device") == "cpu" and cpu_ms and all(
            key(s, v) in cpu_ms for s in shapes for v in options)
        picks = {s: min(options, key=lambda v: per_token(s, v, cpu_ms if by_cpu else ms)) for s in work}
        score = statistics.geometric_mean([per_token(s, picks[s]) for s in work])
        if not best or score < best["score"]:
            best = {"score": score, "picks": picks, "threads": t, "compiled": c}
    return NumericsChoice({s: v[0] for s, v in best["picks"].items()}, best["threads"], best["compiled"], ms,
                          cpu_ms=cpu_ms or {}, machine=machine, agreement=agreement, compile_s=compile_s,
                          measured_s=seconds)
