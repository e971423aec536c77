"""What the tests, the examples and the calibration share: gloo ranks, fake process groups, errors.

    run_ranks(fn, N, *args)         fn(*args) on N spawned gloo ranks on 127.0.0.1; results by rank
                                    (SEQPAR_RANK_POOL=1: on N ranks kept from the last call, see below)
    init_rank(rank, N, port)        what each of those ranks runs first: env vars, loopback gloo,
                                    one intra-op thread, init_process_group("gloo")
    fake_process_group(N, rank)     a process group that never communicates: real world size and
                                    rank for every graph transformation, garbage numbers
    seqpar_error(exc)               the SeqparError inside whatever Dynamo wrapped it in
    error_text(exc), error_line(exc)    its message; 'Type: message' on one line

Usage of the launcher::

    def _body(x):                      # module level, so it pickles
        t = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(t)
        return t

    results = run_ranks(_body, 2, 1.0)  # list indexed by rank

``fn(*args, **kwargs)`` runs in every rank after :func:`init_rank`; a rank finds its own id
with ``dist.get_rank()``. Results travel back through ``torch.save`` files in a temporary
directory, so tensors and nested containers of them are fine. If any rank raises,
:func:`run_ranks` raises :class:`RankError` whose message holds every failing rank's full
traceback; the other ranks (likely blocked in a collective) are killed shortly after. Nothing
waits forever: ranks still running after ``timeout`` seconds are killed and
:class:`RankTimeout` is raised.

With ``SEQPAR_RANK_POOL=1`` (the test suite sets it) the N processes and their process group
outlive the call and run the next call of the same N: process start-up, imports and gloo set-up
(about 8 s a call on 2 cores) are paid once per world size. Each call starts with empty Dynamo
caches and gets the environment variables it started with back. A call that fails or times out
discards its pool (a rank may be stuck in a collective); the next call starts a fresh one.
Examples and the calibration measure per-process memory and run without it.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .errors import SeqparError

__all__ = [
    "RankError", "RankTimeout", "free_port", "init_rank", "run_ranks",
    "init_fake_pg", "fake_process_group",
    "seqpar_error", "error_text", "error_line",
]

#: Seconds the surviving ranks get to finish after one rank has failed.
_FAILURE_GRACE_S = 5.0
#: Seconds between two looks at the rank processes.
_POLL_S = 0.05


# ----------------------------------------------------------------------------- gloo ranks

class RankError(RuntimeError):
    """One or more ranks raised (or died); the message has their tracebacks."""


class RankTimeout(RankError, TimeoutError):
    """Some ranks did not finish within the timeout and were killed."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_rank(rank: int, world_size: int, port: int, timeout: float = 300.0) -> None:
    """Be rank ``rank`` of ``world_size`` gloo ranks on 127.0.0.1:``port``, with one intra-op thread.

    Sets the variables torchrun would set (MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE,
    LOCAL_WORLD_SIZE), pins gloo to the loopback interface unless GLOO_SOCKET_IFNAME is set, and
    initialises the default process group; a collective that waits longer than ``timeout`` seconds fails.
    """
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=max(1.0, timeout))
    )


def _result_path(tmpdir: str, rank: int) -> str:
    return os.path.join(tmpdir, f"rank{rank}.pt")


def _failed_marker(tmpdir: str, rank: int) -> str:
    return os.path.join(tmpdir, f"rank{rank}.failed")


def _worker(
    rank: int,
    world_size: int,
    port: int,
    tmpdir: str,
    timeout: float,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
) -> None:
    """Body of one rank process: init gloo, run ``fn``, save its result or traceback."""
    payload: dict[str, Any]
    try:
        init_rank(rank, world_size, port, timeout)
        payload = {"ok": True, "result": fn(*args, **kwargs)}
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        payload = {"ok": False, "traceback": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - already failing or exiting
                pass
    _save_payload(tmpdir, rank, payload)


def _pool_worker(rank: int, world_size: int, port: int, conn) -> None:
    """Body of one pooled rank: init gloo once, then run every job the parent sends until it sends None."""
    try:
        init_rank(rank, world_size, port, timeout=3600)
    except BaseException:  # noqa: BLE001 - reported with the first job
        conn.send(traceback.format_exc())
        return
    conn.send(None)
    while True:
        job = conn.recv()
        if job is None:
            break
        tmpdir, fn, args, kwargs = job
        env = dict(os.environ)
        torch._dynamo.reset()
        try:
            payload = {"ok": True, "result": fn(*args, **kwargs)}
        except BaseException:  # noqa: BLE001 - every failure goes back to the parent
            payload = {"ok": False, "traceback": traceback.format_exc()}
        os.environ.clear()
        os.environ.update(env)
        _save_payload(tmpdir, rank, payload)
    dist.destroy_process_group()


class _Pool:
    """N rank processes kept between ``run_ranks`` calls of the same N (``SEQPAR_RANK_POOL=1``)."""

    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        port = free_port()
        self.conns, self.procs, self.ready = [], [], False
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_pool_worker, args=(rank, world_size, port, child),
                            name=f"seqpar-pool-rank{rank}", daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def start(self, tmpdir, fn, args, kwargs) -> list:
        """Send the job; returns the ranks that failed to start (their tracebacks)."""
        errors = []
        if not self.ready:                           # each rank says None once gloo is up, or why not
            for rank, conn in enumerate(self.conns):
                msg = conn.recv() if conn.poll(600) else "no answer from the rank within 600 s"
                if msg is not None:
                    errors.append(f"--- rank {rank} failed to start ---\n{msg}")
            self.ready = True
        if not errors:
            for conn in self.conns:
                conn.send((tmpdir, fn, args, kwargs))
        return errors

    def close(self, kill: bool = False) -> None:
        for conn, p in zip(self.conns, self.procs):
            if not kill and p.is_alive():
                with contextlib.suppress(Exception):
                    conn.send(None)
                p.join(5.0)
            _kill(p)


_POOLS: dict = {}


@atexit.register
def _close_pools() -> None:
    while _POOLS:
        _POOLS.popitem()[1].close()


def _save_payload(tmpdir: str, rank: int, payload: dict) -> None:
    path = _result_path(tmpdir, rank)
    try:
        torch.save(payload, path + ".tmp")
    except Exception:  # noqa: BLE001 - e.g. an unpicklable result
        payload = {"ok": False, "traceback": "could not save the result:\n" + traceback.format_exc()}
        torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: the parent never sees half a file
    if not payload["ok"]:
        open(_failed_marker(tmpdir, rank), "w").close()


def _kill(proc: mp.Process) -> None:
    if proc.is_alive():
        proc.terminate()
        proc.join(2.0)
    if proc.is_alive():
        proc.kill()
        proc.join(2.0)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return results by rank.

    ``fn`` must be a module-level function (it is pickled into spawned
    processes). Each rank uses one intra-op thread. Raises :class:`RankError`
    with the tracebacks of the ranks that failed, or :class:`RankTimeout` when
    ranks were still running after ``timeout`` seconds.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    pooled = os.environ.get("SEQPAR_RANK_POOL") == "1"
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="seqpar-ranks-") as tmpdir:
        if pooled:
            pool = _POOLS.get(world_size) or _POOLS.setdefault(world_size, _Pool(world_size))
            procs = pool.procs
            start_errors = pool.start(tmpdir, fn, args, kwargs)
            if start_errors:
                _POOLS.pop(world_size).close(kill=True)
                raise RankError(f"run_ranks({getattr(fn, '__qualname__', fn)!s}): the pool did not start\n"
                                + "\n".join(start_errors))
        else:
            port = free_port()
            procs = [
                ctx.Process(
                    target=_worker,
                    args=(rank, world_size, port, tmpdir, timeout, fn, args, kwargs),
                    name=f"seqpar-rank{rank}",
                    daemon=False,
                )
                for rank in range(world_size)
            ]
            for p in procs:
                p.start()

        def running():
            if pooled:                               # the job is done when every rank left its result
                return [p for r, p in enumerate(procs) if p.is_alive() and not os.path.exists(_result_path(tmpdir, r))]
            return [p for p in procs if p.is_alive()]

        deadline = time.monotonic() + timeout
        failed_at: float | None = None
        timed_out = False
        try:
            while running():
                now = time.monotonic()
                if failed_at is None and any(
                    os.path.exists(_failed_marker(tmpdir, r))
                    or (not p.is_alive() and p.exitcode not in (None, 0))
                    for r, p in enumerate(procs)
                ):
                    failed_at = now
                if failed_at is not None and now - failed_at > _FAILURE_GRACE_S:
                    break
                if now > deadline:
                    timed_out = True
                    break
                time.sleep(_POLL_S)
        finally:
            left = running()
            stragglers = [r for r, p in enumerate(procs) if p in left]
            if not pooled:
                for p in procs:
                    _kill(p)
            elif left or failed_at is not None or any(not p.is_alive() for p in procs):
                _POOLS.pop(world_size).close(kill=True)    # a rank may be stuck in a collective: start afresh

        results: list[Any] = [None] * world_size
        errors: list[str] = []
        for rank, proc in enumerate(procs):
            path = _result_path(tmpdir, rank)
            if os.path.exists(path):
                payload = torch.load(path, weights_only=False)
                if payload["ok"]:
                    results[rank] = payload["result"]
                else:
                    errors.append(f"--- rank {rank} raised ---\n{payload['traceback']}")
            elif rank in stragglers:
                why = "timed out" if timed_out else "killed after another rank failed"
                errors.append(f"--- rank {rank} {why} (still running) ---")
            else:
                errors.append(f"--- rank {rank} died with exit code {proc.exitcode} and no result ---")

        if errors:
            head = (
                f"{len(stragglers)} of {world_size} ranks still running after {timeout:g}s"
                if timed_out
                else f"{len(errors)} of {world_size} ranks failed"
            )
            cls = RankTimeout if timed_out else RankError
            raise cls(f"run_ranks({getattr(fn, '__qualname__', fn)!s}): {head}\n" + "\n".join(errors))
        return results


# ----------------------------------------------------------------------------- fake process groups

def init_fake_pg(world: int, rank: int = 0) -> None:
    """A fake process group (any existing group is destroyed first): collectives are no-ops, so
    outputs are garbage, but the world size and rank the backend sees are real, and so is every
    graph transformation."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


@contextlib.contextmanager
def fake_process_group(world: int, rank: int = 0) -> Iterator[None]:
    """:func:`init_fake_pg` for the duration of the ``with`` block; destroyed afterwards, whatever happens."""
    init_fake_pg(world, rank)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- errors

def seqpar_error(exc: BaseException) -> Optional[SeqparError]:
    """The seqpar error inside whatever Dynamo wrapped it in (``BackendCompilerFailed``):
    ``exc`` itself or one found through ``inner_exception``, ``__cause__`` and ``__context__``
    (nearest first); None if there is none."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, SeqparError):
            return e
        todo += [getattr(e, "inner_exception", None), e.__cause__, e.__context__]
    return None


def error_text(exc: BaseException) -> str:
    """The seqpar error's message if one is in the chain, else the wrapper's."""
    inner = seqpar_error(exc)
    return str(inner if inner is not None else exc)


def error_line(exc: BaseException) -> str:
    """'Type: message' of the seqpar error in the chain (else of ``exc``), white space folded to one line."""
    inner = seqpar_error(exc)
    cause = inner if inner is not None else exc
    return f"{type(cause).__name__}: {' '.join(str(cause).split())}"
