"""``seqpar bench``: measured prefill latency per strategy, beside one-device and transformers references.

    seqpar bench --model bench-125m --layers 2 --seq-lens 512,1024 --world-size 2 --out bench/
    seqpar bench --model config.json --seq-lens 1024 --strategies tp,ulysses --references eager --runs 9
    torchrun --nproc-per-node 8 -m sp_compiler.cli bench --model llama-3-8b --seq-lens 4096,16384 \\
        --dtype bfloat16 --out bench/

Without torchrun the command spawns ``--world-size`` gloo ranks on 127.0.0.1, one intra-op thread
each (``sp_compiler.testing.run_ranks``); under torchrun (RANK and WORLD_SIZE set) every process is
one rank (NCCL on GPUs, gloo on CPU). Every rank builds the same random-weight model
(``torch.manual_seed(0)``) and prompt, then for each sequence length runs:

    eager       one device (rank 0; the others wait): the uncompiled model. Its logits are the reference.
    compile     one device: torch.compile(model) with the same lowering as seqpar (``--lower``)
    hf_tp       every rank: transformers' own tensor parallelism, ``tp_plan="auto"``, on the same weights
    <strategy>  every rank: torch.compile(model, backend="seqpar", options={"strategy": s, "lower": ...})

The timed call is a generation's prefill with HuggingFace's defaults, :data:`PREFILL_CALL`:
``model(input_ids, logits_to_keep=1, use_cache=True)`` -- the KV cache is built and, with seqpar's
default ``outputs="replicate"``, gathered to every rank
(``--outputs local`` keeps each rank's share, as hf_tp does). For each run:

- the first call (it compiles) and ``--warmup`` more are not timed; ``compile s`` = first call - median call;
- ``--runs`` timed calls, each started after a barrier; a call's time is the slowest rank's; median, min, max;
- bytes: one more, untimed, call under :class:`CollectiveCounter` (the collectives that ran, NCCL-tests sizes);
- max |diff|: last-token logits against the one-device eager logits, largest over ranks;
- peak memory per rank: CUDA ``max_memory_allocated`` during the run; on CPU (Linux) the peak resident
  set during the run (VmHWM, reset when the run starts through ``/proc/self/clear_refs``);
- predicted ms: ``sp_compiler.plan.plan(..., call=PREFILL_CALL)`` on ``--machine`` for the same model,
  world, batch and length; the predicted and measured rankings of the strategies are compared.

Results: :func:`run_bench` returns a dict (``bench.json``); ``bench_report.format_table`` is ``bench.md``;
``bench_report.plot`` draws ``bench.png`` (needs matplotlib: ``pip install -e '.[bench]'``). The
collectives are counted by ``counter.CollectiveCounter``; ``bench_generate`` times generations.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .bench_report import format_table, kendall_tau, plot, rankings, write_outputs
from .counter import CollectiveCounter
from .errors import SeqparError

__all__ = [
    "BenchError", "BenchSpec", "DTYPES", "PREFILL_CALL", "REFERENCES", "EXTRAS", "missing_extras", "resolve_machine",
    "truncated_config", "build_model", "input_ids", "predict", "bench_rank", "run_bench",
    # bench_report's and counter's, for the CLI and the tests' one import
    "format_table", "write_outputs", "plot", "rankings", "kendall_tau", "CollectiveCounter",
]

log = logging.getLogger("seqpar")

#: The timed forward's keyword arguments: a generation's prefill, HF's defaults made explicit.
PREFILL_CALL = {"logits_to_keep": 1, "use_cache": True}
_CALL_TEXT = "model(input_ids, " + ", ".join(f"{k}={v}" for k, v in PREFILL_CALL.items()) + ")"
#: Reference runs, in table order.
REFERENCES = ("eager", "compile", "hf_tp")
#: Python module -> pip package of the ``bench`` extra, and what needs it.
EXTRAS = {"tqdm": "tqdm", "matplotlib": "matplotlib", "accelerate": "accelerate (for hf_tp)"}
DTYPES = ("float32", "bfloat16", "float16")
_ONE_DEVICE_BACKEND = {"inductor": "inductor", "aot_eager": "aot_eager", "eager": "eager"}


class BenchError(SeqparError, ValueError):
    """A bench that cannot run as asked (options, missing packages, failed ranks); the message says what to change."""


@dataclass(frozen=True)
class BenchSpec:
    """What to measure. ``config`` is the (already truncated) transformers config; ``machine`` a profile
    name, a ``MachineProfile``, ``"auto"`` or None (no predictions)."""
    model: str
    config: Any
    seq_lens: tuple
    world: int
    batch: int = 1
    strategies: tuple = ()
    references: tuple = REFERENCES
    runs: int = 5
    warmup: int = 1
    lower: str = "inductor"
    outputs: str = "replicate"
    dtype: str = "float32"
    machine: Any = "auto"
    timeout: float = 3600.0
    progress: bool = True
    generate: int = 0                # > 0: time model.generate of this many new tokens (sp_compiler.bench_generate)

    def check(self) -> "BenchSpec":
        """Validated copy (strategies default to all of them); raises BenchError listing what is valid."""
        from .config import LOWERINGS, OUTPUTS
        from .strategies import STRATEGIES

        strategies = tuple(self.strategies) or tuple(STRATEGIES)
        bad = [s for s in strategies if s not in STRATEGIES]
        if bad:
            raise BenchError(f"unknown strategies {bad}; choose from {list(STRATEGIES)}")
        bad = [r for r in self.references if r not in REFERENCES]
        if bad:
            raise BenchError(f"unknown references {bad}; choose from {list(REFERENCES)} (or 'none')")
        if self.lower not in LOWERINGS:
            raise BenchError(f"lower={self.lower!r}; choose one of {list(LOWERINGS)}")
        if self.outputs not in OUTPUTS:
            raise BenchError(f"outputs={self.outputs!r}; choose one of {list(OUTPUTS)}")
        if self.dtype not in DTYPES:
            raise BenchError(f"dtype={self.dtype!r}; choose one of {list(DTYPES)}")
        if not self.seq_lens or any(int(s) < 1 for s in self.seq_lens):
            raise BenchError(f"seq_lens={list(self.seq_lens)}: give one or more positive lengths, e.g. 1024,4096")
        if self.generate < 0:
            raise BenchError(f"generate={self.generate}: give the number of new tokens per generation, e.g. 16")
        if self.runs < 1 or self.warmup < 0 or self.batch < 1 or self.world < 1:
            raise BenchError(f"runs={self.runs} and batch={self.batch} and world={self.world} must be >= 1, "
                             f"warmup={self.warmup} >= 0")
        return dataclasses.replace(self, strategies=strategies, references=tuple(self.references),
                                   seq_lens=tuple(int(s) for s in self.seq_lens))


# ----------------------------------------------------------------------------- setup

def missing_extras(references: Sequence[str] = REFERENCES) -> List[str]:
    """Packages of the ``bench`` extra that are not installed (accelerate only when hf_tp is asked for)."""
    import importlib.util

    need = [m for m in ("tqdm", "matplotlib") if importlib.util.find_spec(m) is None]
    if "hf_tp" in references and importlib.util.find_spec("accelerate") is None:
        need.append("accelerate")
    return [EXTRAS[m] for m in need]


def resolve_machine(machine):
    """A MachineProfile for predictions, or None for 'none'. 'auto': the GPU's profile under CUDA, else
    cpu-gloo (the saved calibration; without one, ``get_profile`` measures this machine, ~10 s)."""
    from .cost_model import CPU_PROFILE, cuda_profile_name, get_profile

    if machine is None or machine == "none":
        return None
    if machine == "auto":
        machine = cuda_profile_name() or CPU_PROFILE
    return get_profile(machine)


def truncated_config(config, layers: Optional[int]):
    """``config`` with its first ``layers`` decoder layers (all when None)."""
    from .plan import _truncated

    if layers is None:
        return config
    if layers < 1:
        raise BenchError(f"layers={layers}: keep at least one decoder layer")
    return _truncated(config, layers)


def build_model(config, dtype: str = "float32", device="cpu") -> torch.nn.Module:
    """The random-weight causal LM every rank builds alike: seed 0, ``dtype``, on ``device``, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return model.eval()


def input_ids(config, batch: int, seq_len: int, device="cpu") -> torch.Tensor:
    """The prompt: ``[batch, seq_len]`` token ids from seed 1, the same on every rank."""
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    return ids.to(device)


def _device() -> torch.device:
    """cuda:LOCAL_RANK under NCCL, else cpu."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# ----------------------------------------------------------------------------- predictions

def predict(spec: BenchSpec, machine) -> Dict[int, Dict[str, dict]]:
    """{seq_len: {strategy: {"ms", "ok", "error", "collectives"}}} from the cost model for the timed call."""
    from .plan import plan

    layers = min(2, spec.config.num_hidden_layers)
    out = {}
    for seq_len in spec.seq_lens:
        try:
            preds = plan(spec.config, world=spec.world, seq_len=seq_len, batch=spec.batch, machine=machine,
                         strategies=spec.strategies, layers=layers, call=PREFILL_CALL, outputs=spec.outputs)
            out[seq_len] = {p.strategy: {"ms": p.total_s * 1e3 if p.ok else None, "ok": p.ok, "error": p.error,
                                         "collectives": p.collectives} for p in preds}
        except SeqparError as e:
            out[seq_len] = {s: {"ms": None, "ok": False, "error": f"{type(e).__name__}: {e}", "collectives": ""}
                            for s in spec.strategies}
    return out


# ----------------------------------------------------------------------------- one rank

def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reduce(values: Sequence[float], dev, op=dist.ReduceOp.MAX) -> List[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=op)
    return t.tolist()


def _gather(value: float, dev) -> List[float]:
    parts = [torch.zeros(1, dtype=torch.float64, device=dev) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, torch.tensor([value], dtype=torch.float64, device=dev))
    return [p.item() for p in parts]


def _reset_peak(dev) -> None:
    """Start a peak-memory window: CUDA's allocator stats, or on Linux the process's RSS high-water mark
    (writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS)."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass                                              # not Linux: ru_maxrss, the peak since the start


def _peak_bytes(dev) -> float:
    """CUDA: peak allocated since ``_reset_peak``; CPU: peak RSS since ``_reset_peak`` (Linux VmHWM), else the
    process's peak so far (ru_maxrss)."""
    if dev.type == "cuda":
        return float(torch.cuda.max_memory_allocated(dev))
    try:
        with open("/proc/self/status") as f:
            return float(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))) * 1024.0
    except (OSError, StopIteration):
        import resource

        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0


def _timed(fwd, dev, ranks: bool) -> float:
    """Seconds of one call; with ``ranks`` the slowest rank's, all starting after a barrier."""
    if ranks:
        dist.barrier()
    _sync(dev)
    t0 = time.perf_counter()
    fwd()
    _sync(dev)
    dt = time.perf_counter() - t0
    return _reduce([dt], dev)[0] if ranks else dt


def _measure(make, spec: BenchSpec, dev, ranks: bool) -> dict:
    """Build the forward (``make()``), call it once (compiles), warm it up, time it, count one call."""
    from . import backend

    _reset_peak(dev)
    compiles = backend.compile_count()
    fwd = make()
    with torch.no_grad():
        _sync(dev)
        t0 = time.perf_counter()
        logits = fwd().logits[:, -1].float()
        _sync(dev)
        first = time.perf_counter() - t0
        graphs = backend.compile_count() - compiles
        report = backend.last_report() if graphs == 1 else None
        for _ in range(spec.warmup):
            fwd()
        times = [_timed(fwd, dev, ranks) for _ in range(spec.runs)]
        with CollectiveCounter() as counter:
            fwd()
    return {"first_s": first, "times_s": times, "logits": logits, "counter": counter, "peak": _peak_bytes(dev),
            "graph_bytes": sum(r["bytes"] for r in report) if report is not None else None}


def _row(seq_len: int, name: str, kind: str, **values) -> dict:
    return {"seq_len": seq_len, "name": name, "kind": kind, "ok": True, "error": None, **values}


def _summary(m: dict, ref: torch.Tensor, dev, ranks: bool, compiled: bool) -> dict:
    """JSON-ready numbers of one measurement (collectives across ranks when ``ranks``)."""
    times = [t * 1e3 for t in m["times_s"]]
    median = statistics.median(times)
    first = _reduce([m["first_s"]], dev)[0] if ranks else m["first_s"]
    diff = (m["logits"] - ref).abs().max().item() if ref is not None else 0.0
    c = m["counter"]
    total = c.total_bytes
    if ranks:
        diff = _reduce([diff], dev)[0]
        per_rank = _gather(-1.0 if total is None else float(total), dev)
        peaks = _gather(m["peak"], dev)
    else:
        per_rank, peaks = [-1.0 if total is None else float(total)], [m["peak"]]
    counted = None if any(b < 0 for b in per_rank) else int(max(per_rank))
    return {
        "times_ms": times, "median_ms": median, "min_ms": min(times), "max_ms": max(times),
        "first_call_s": first, "compile_s": max(first - median / 1e3, 0.0) if compiled else None,
        "bytes": counted, "bytes_per_rank": [None if b < 0 else int(b) for b in per_rank],
        "collectives": {k: {"calls": c.calls[k], "bytes": c.bytes[k]} for k in sorted(c.calls)},
        "rank_check": {"calls": c.checks[0], "bytes": c.checks[1]},
        "collectives_text": c.describe(), "unknown_ops": sorted(c.unknown), "graph_bytes": m["graph_bytes"],
        "max_abs_diff": diff, "peak_bytes_per_rank": peaks,
    }


def _failed(seq_len, name, kind, error: str) -> dict:
    row = _row(seq_len, name, kind)
    row.update(ok=False, error=error)
    return row


def _on_all_ranks(seq_len, name, kind, make, spec, dev, ref, compiled=True) -> dict:
    """Measure ``make()`` on every rank; every rank agrees on failure before any further collective."""
    from .testing import error_line

    err, m = None, None
    try:
        m = _measure(make, spec, dev, ranks=True)
    except Exception as e:  # noqa: BLE001 - reported in the table; compile errors are the same on every rank
        err = error_line(e)
        log.debug("seqpar bench: %s at %d failed", name, seq_len, exc_info=True)
    if _reduce([1.0 if err else 0.0], dev)[0]:
        return _failed(seq_len, name, kind, err or "failed on another rank")
    return _row(seq_len, name, kind, **_summary(m, ref, dev, ranks=True, compiled=compiled))


def _one_device(seq_len, model, ids, spec, dev, bar) -> tuple:
    """Rank 0 alone: the eager reference (always run: its logits are the reference) and the compile
    reference; the other ranks wait. Returns (reference logits on every rank, rows on rank 0)."""
    rows, ref = [], None
    _label(bar, seq_len, "eager")
    if dist.get_rank() == 0:
        torch._dynamo.reset()
        if "eager" in spec.references:
            m = _measure(lambda: lambda: model(ids, **PREFILL_CALL), spec, dev, ranks=False)
            ref = m["logits"]
            rows.append(_row(seq_len, "eager", "reference", **_summary(m, ref, dev, False, compiled=False)))
            _tick(bar)
        else:
            with torch.no_grad():
                ref = model(ids, **PREFILL_CALL).logits[:, -1].float()
        if "compile" in spec.references:
            _label(bar, seq_len, "compile")
            backend_name = _ONE_DEVICE_BACKEND[spec.lower]

            def make():
                fast = torch.compile(model, backend=backend_name, dynamic=False)
                return lambda: fast(ids, **PREFILL_CALL)
            try:
                m = _measure(make, spec, dev, ranks=False)
                rows.append(_row(seq_len, "compile", "reference", **_summary(m, ref, dev, False, compiled=True)))
            except Exception as e:  # noqa: BLE001 - reported in the table
                from .testing import error_line

                rows.append(_failed(seq_len, "compile", "reference", error_line(e)))
            torch._dynamo.reset()
            _tick(bar)
    dist.barrier()
    shape = (ids.shape[0], model.config.vocab_size)
    ref = ref.contiguous() if ref is not None else torch.empty(shape, dtype=torch.float32, device=dev)
    dist.broadcast(ref, src=0)
    return ref, rows


def _hf_tp_model(model, spec: BenchSpec, dev):
    """transformers' tensor parallelism on the same weights: ``from_pretrained(None, state_dict=...,
    DistributedConfig(tp_plan="auto"))`` on every rank (needs accelerate). Returns (model, None) or (None, error)."""
    from transformers import DistributedConfig

    from .testing import error_line

    err, tp = None, None
    try:
        tp = type(model).from_pretrained(None, config=model.config, state_dict=model.state_dict(),
                                         dtype=getattr(torch, spec.dtype),
                                         distributed_config=DistributedConfig(tp_plan="auto")).eval()
    except Exception as e:  # noqa: BLE001 - reported in every hf_tp row
        err = error_line(e)
    if _reduce([1.0 if err else 0.0], dev)[0]:
        return None, err or "failed on another rank"
    return tp, None


def _label(bar, seq_len, name) -> None:
    """Show what runs now."""
    if bar is not None:
        bar.set_description(f"S={seq_len} {name}")


def _tick(bar) -> None:
    if bar is not None:
        bar.update(1)


def _progress(spec: BenchSpec, predicting: bool):
    """A tqdm bar on rank 0 (stderr), None when off or tqdm is missing."""
    if not spec.progress or dist.get_rank() != 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    steps = len(spec.seq_lens) * (len(spec.references) + len(spec.strategies) + (1 if predicting else 0))
    return tqdm(total=steps, desc="seqpar bench", unit="run", file=sys.stderr, dynamic_ncols=True)


def bench_rank(spec: BenchSpec) -> Optional[dict]:
    """Every rank's body (the process group is up): all measurements; rank 0 returns
    {"rows": [...], "predictions": {...}, "machine": {...}, "env": {...}}, the others None."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    rank, dev = dist.get_rank(), _device()
    model = build_model(spec.config, spec.dtype, dev)
    machine = resolve_machine(spec.machine) if rank == 0 else None
    bar = _progress(spec, machine is not None)
    predictions = {}
    if machine is not None:
        for seq_len in spec.seq_lens:
            _label(bar, seq_len, "predict")
            predictions.update(predict(dataclasses.replace(spec, seq_lens=(seq_len,)), machine))
            _tick(bar)
        torch._dynamo.reset()
    dist.barrier()
    tp, tp_error = _hf_tp_model(model, spec, dev) if "hf_tp" in spec.references else (None, None)
    rows = []
    for seq_len in spec.seq_lens:
        ids = input_ids(spec.config, spec.batch, seq_len, dev)
        if spec.generate:
            from .bench_generate import bench_generations

            rows += bench_generations(spec, model, tp, tp_error, seq_len, ids, dev, bar)
            continue
        ref, ref_rows = _one_device(seq_len, model, ids, spec, dev, bar)
        rows += ref_rows
        if "hf_tp" in spec.references:
            _label(bar, seq_len, "hf_tp")
            rows.append(_on_all_ranks(seq_len, "hf_tp", "reference", lambda: lambda: tp(ids, **PREFILL_CALL),
                                      spec, dev, ref, compiled=False) if tp is not None
                        else _failed(seq_len, "hf_tp", "reference", tp_error))
            _tick(bar)
        for name in spec.strategies:
            def make(name=name):
                fast = torch.compile(model, backend="seqpar", dynamic=False,
                                     options={"strategy": name, "lower": spec.lower, "outputs": spec.outputs})
                return lambda: fast(ids, **PREFILL_CALL)
            _label(bar, seq_len, name)
            torch._dynamo.reset()
            rows.append(_on_all_ranks(seq_len, name, "strategy", make, spec, dev, ref))
            torch._dynamo.reset()
            _tick(bar)
    if bar is not None:
        bar.close()
    if rank != 0:
        return None
    env = {"device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
           "backend": dist.get_backend(), "threads_per_rank": torch.get_num_threads(),
           "torch": torch.__version__, "transformers": transformers.__version__}
    return {"rows": rows, "predictions": predictions, "env": env,
            "machine": dataclasses.asdict(machine) if machine is not None else None}


# ----------------------------------------------------------------------------- driver

def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _torchrun_body(spec: BenchSpec) -> Optional[dict]:
    """This process is one rank of torchrun: init NCCL (GPU) or gloo, run the body, tear down."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=spec.timeout))
    try:
        if dist.get_world_size() != spec.world:
            raise BenchError(f"--world-size {spec.world} but torchrun started {dist.get_world_size()} ranks; "
                             f"leave --world-size out under torchrun")
        out = bench_rank(spec)
        dist.barrier()
        return out
    finally:
        dist.destroy_process_group()


def run_bench(spec: BenchSpec) -> Optional[dict]:
    """Measure everything ``spec`` asks for; the result dict (``bench.json``), or None on torchrun ranks > 0.

    Spawns ``spec.world`` gloo ranks unless this process is a torchrun rank. Raises BenchError when
    ranks fail or time out (their tracebacks in the message).
    """
    from .testing import RankError, run_ranks

    spec = spec.check()
    t0, load = time.perf_counter(), os.getloadavg()[0]
    if _under_torchrun():
        out = _torchrun_body(spec)
        if out is None:
            return None
    else:
        if spec.machine not in (None, "none"):
            spec = dataclasses.replace(spec, machine=resolve_machine(spec.machine))   # calibrates here, not in a rank
        try:
            out = run_ranks(bench_rank, spec.world, spec, timeout=spec.timeout)[0]
        except RankError as e:
            raise BenchError(f"the bench ranks failed: {e}") from e
    result = _assemble(spec, out, time.perf_counter() - t0)
    result["meta"].update(load_average=[load, os.getloadavg()[0]], cpus=os.cpu_count())
    return result


def _config_summary(config) -> dict:
    keys = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size")
    return {k: getattr(config, k, None) for k in keys}


def _assemble(spec: BenchSpec, out: dict, wall_s: float) -> dict:
    """Rank 0's measurements + predictions -> the result dict, with rankings."""
    rows = out["rows"]
    for row in rows:
        pred = out["predictions"].get(row["seq_len"], {}).get(row["name"]) if row["kind"] == "strategy" else None
        row["predicted_ms"] = pred["ms"] if pred else None
        row["predicted_error"] = pred["error"] if pred and not pred["ok"] else None
    result = {
        "meta": {
            "model": spec.model, "config": _config_summary(spec.config), "world": spec.world, "batch": spec.batch,
            "seq_lens": list(spec.seq_lens), "dtype": spec.dtype, "lower": spec.lower, "outputs": spec.outputs,
            "runs": spec.runs, "warmup": spec.warmup, "machine": out["machine"], **out["env"],
            "call": _CALL_TEXT if not spec.generate else f"model.generate(input_ids, max_new_tokens={spec.generate}, "
                                                          f"min_new_tokens={spec.generate}, do_sample=False)",
            "generate": spec.generate,
            "wall_s": wall_s,
            "peak_memory": ("torch.cuda.max_memory_allocated during the run" if out["env"]["backend"] == "nccl"
                            else "VmHWM: the process's peak RSS during the run (reset at its start)"),
            "bytes": "per forward, per rank, counted from the collectives that ran (NCCL-tests sizes: "
                     "all_gather = what arrives, the others = what is sent)",
        },
        "rows": rows,
    }
    result["rankings"] = rankings(result)
    for row in rows:
        order = result["rankings"][row["seq_len"]]
        for key in ("measured", "predicted"):
            row[f"{key}_rank"] = order[key].index(row["name"]) + 1 if row["name"] in order[key] else None
    return result
