"""``seqpar bench --generate K``: time to first token and time per output token of ``model.generate``.

    seqpar bench --model bench-125m --layers 2 --seq-lens 1024,4096 --world-size 2 --generate 16

The same runs as the prefill bench (``sp_compiler.bench``), each a greedy generation of exactly K new
tokens with HuggingFace's defaults (``GENERATE_CALL``):

    eager, compile   one device (rank 0): the uncompiled model, and model.compile(backend=<--lower>)
    hf_tp            every rank: transformers' tp_plan="auto" model's own generate
    <strategy>       every rank: model.compile(backend="seqpar", options={..., "outputs": <--outputs>})

A ``TokenClock`` streamer stamps every token as ``generate`` emits it: time to first token (TTFT) is
prompt -> first new token (the prefill and one sampling step), time per output token (TPOT) the mean
gap between the later ones (the decode steps). The first generation compiles and is not timed; then
``--warmup`` and ``--runs`` generations, each the slowest rank's. Beside each: whether every rank's
tokens equal one-device eager's, the bytes of one whole generation counted from the collectives that
ran, and per-rank peak memory.
"""
from __future__ import annotations

import statistics
import time
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["GENERATE_CALL", "TokenClock", "generate_call", "measure_generation", "generation_summary"]

#: ``generate`` keyword arguments besides ``max_new_tokens`` / ``min_new_tokens``: HF's defaults, greedy.
GENERATE_CALL = {"do_sample": False}


class TokenClock:
    """A ``generate(streamer=...)`` that stamps each ``put``: the prompt first, then every new token."""

    def __init__(self):
        self.start, self.times = time.perf_counter(), []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def ttft_tpot_s(self) -> tuple:
        """(seconds to the first new token, mean seconds per later token; 0 with one new token)."""
        first = self.times[1] - self.start
        later = len(self.times) - 2
        return first, (self.times[-1] - self.times[1]) / later if later else 0.0


def generate_call(model, ids, new_tokens: int):
    """A callable running one greedy generation of exactly ``new_tokens``; returns (tokens, clock)."""
    def run():
        clock = TokenClock()
        tokens = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock,
                                **GENERATE_CALL)
        return tokens, clock
    return run


def measure_generation(make, spec, dev, ranks: bool) -> dict:
    """Build the generation (``make()``), run it once (it compiles), warm up, time ``spec.runs`` runs
    (TTFT and TPOT, the slowest rank's when ``ranks``), count one more run's collectives."""
    from . import backend
    from .bench import _peak_bytes, _reduce, _reset_peak, _sync
    from .counter import CollectiveCounter

    _reset_peak(dev)
    compiles = backend.compile_count()
    gen = make()
    with torch.no_grad():
        t0 = time.perf_counter()
        tokens, _ = gen()
        _sync(dev)
        first = time.perf_counter() - t0
        graphs = backend.compile_count() - compiles
        for _ in range(spec.warmup):
            gen()
        ttft, tpot = [], []
        for _ in range(spec.runs):
            if ranks:
                dist.barrier()
            _, clock = gen()
            _sync(dev)
            a, b = clock.ttft_tpot_s()
            if ranks:
                a, b = _reduce([a, b], dev)
            ttft.append(a)
            tpot.append(b)
        with CollectiveCounter() as counter:
            gen()
    return {"first_s": first, "ttft_s": ttft, "tpot_s": tpot, "tokens": tokens, "counter": counter,
            "peak": _peak_bytes(dev), "graphs": graphs, "new_tokens": spec.generate}


def generation_summary(m: dict, ref_tokens: Optional[torch.Tensor], dev, ranks: bool, compiled: bool) -> dict:
    """JSON-ready numbers of one generation measurement."""
    from .bench import _gather, _reduce

    ttft, tpot = [t * 1e3 for t in m["ttft_s"]], [t * 1e3 for t in m["tpot_s"]]
    same = float(ref_tokens is None or torch.equal(m["tokens"].to(ref_tokens.device), ref_tokens))
    total = m["counter"].total_bytes
    first = m["first_s"]
    if ranks:
        same = _reduce([same], dev, op=dist.ReduceOp.MIN)[0]
        first = _reduce([first], dev)[0]
        per_rank, peaks = _gather(-1.0 if total is None else float(total), dev), _gather(m["peak"], dev)
    else:
        per_rank, peaks = [-1.0 if total is None else float(total)], [m["peak"]]
    gen_ms = statistics.median(ttft) + statistics.median(tpot) * max(0, m["new_tokens"] - 1)
    return {
        "ttft_ms": statistics.median(ttft), "ttft_min_ms": min(ttft), "ttft_max_ms": max(ttft),
        "tpot_ms": statistics.median(tpot), "tpot_min_ms": min(tpot), "tpot_max_ms": max(tpot),
        "median_ms": statistics.median(ttft), "min_ms": min(ttft), "max_ms": max(ttft),      # what rankings sort
        "tokens_same": bool(same), "first_call_s": first,
        "compile_s": max(first - gen_ms / 1e3, 0.0) if compiled else None, "seqpar_graphs": m["graphs"],
        "bytes": None if any(b < 0 for b in per_rank) else int(max(per_rank)),
        "collectives_text": m["counter"].describe(), "unknown_ops": sorted(m["counter"].unknown),
        "peak_bytes_per_rank": peaks,
    }


def _uncompiled(model):
    """Undo ``model.compile(...)`` (so the next run compiles with its own backend)."""
    model._compiled_call_impl = None
    torch._dynamo.reset()
    return model


def _compiled(model, backend, options=None):
    """``model.compile(backend=..., options=...)``, the form ``generate`` goes through."""
    _uncompiled(model).compile(backend=backend, options=options, dynamic=None)
    return model


def bench_generations(spec, model, tp, tp_error, seq_len, ids, dev, bar) -> list:
    """Every run of one prompt length in ``--generate`` mode (rows as ``bench_rank`` returns them)."""
    from .bench import _failed, _label, _ONE_DEVICE_BACKEND, _reduce, _row, _tick
    from .testing import error_line

    K, rows = spec.generate, []
    ref = torch.zeros(ids.shape[0], ids.shape[1] + K, dtype=torch.long, device=dev)
    if dist.get_rank() == 0:
        _label(bar, seq_len, "eager")
        m = measure_generation(lambda: generate_call(_uncompiled(model), ids, K), spec, dev, ranks=False)
        ref = m["tokens"]
        if "eager" in spec.references:
            rows.append(_row(seq_len, "eager", "reference", **generation_summary(m, ref, dev, False, False)))
        _tick(bar)
        if "compile" in spec.references:
            _label(bar, seq_len, "compile")
            try:
                make = lambda: generate_call(_compiled(model, _ONE_DEVICE_BACKEND[spec.lower]), ids, K)  # noqa: E731
                m = measure_generation(make, spec, dev, ranks=False)
                rows.append(_row(seq_len, "compile", "reference", **generation_summary(m, ref, dev, False, True)))
            except Exception as e:  # noqa: BLE001 - reported in the table
                rows.append(_failed(seq_len, "compile", "reference", error_line(e)))
            _uncompiled(model)
            _tick(bar)
    dist.barrier()
    dist.broadcast(ref, src=0)

    def on_all_ranks(name, kind, make, compiled):
        err, m = None, None
        try:
            m = measure_generation(make, spec, dev, ranks=True)
        except Exception as e:  # noqa: BLE001 - reported in the table; the same on every rank
            err = error_line(e)
        if _reduce([1.0 if err else 0.0], dev)[0]:
            return _failed(seq_len, name, kind, err or "failed on another rank")
        return _row(seq_len, name, kind, **generation_summary(m, ref, dev, True, compiled))

    if "hf_tp" in spec.references:
        _label(bar, seq_len, "hf_tp")
        rows.append(on_all_ranks("hf_tp", "reference", lambda: generate_call(tp, ids, K), False) if tp is not None
                    else _failed(seq_len, "hf_tp", "reference", tp_error))
        _tick(bar)
    for name in spec.strategies:
        _label(bar, seq_len, name)
        options = {"strategy": name, "lower": spec.lower, "outputs": spec.outputs}
        rows.append(on_all_ranks(name, "strategy", lambda: generate_call(_compiled(model, "seqpar", options), ids, K),
                                 True))
        _uncompiled(model)
        _tick(bar)
    return rows
