"""Run a function on N gloo ranks on 127.0.0.1 and hand each rank's result back.

Usage from a test::

    def _body(x):                      # module level, so it pickles
        t = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(t)
        return t

    results = run_ranks(_body, 2, 1.0)  # list indexed by rank

``fn(*args, **kwargs)`` runs in every rank after ``dist.init_process_group("gloo")``;
a rank finds its own id with ``dist.get_rank()``. Results travel back through
``torch.save`` files in a temporary directory, so tensors and nested containers
of them are fine. If any rank raises, :func:`run_ranks` raises
:class:`RankError` whose message holds every failing rank's full traceback; the
other ranks (likely blocked in a collective) are killed shortly after. Nothing
waits forever: ranks still running after ``timeout`` seconds are killed and
:class:`RankTimeout` is raised.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["RankError", "RankTimeout", "free_port", "run_ranks"]

#: Seconds the surviving ranks get to finish after one rank has failed.
_FAILURE_GRACE_S = 5.0
#: Seconds between two looks at the rank processes.
_POLL_S = 0.05


class RankError(RuntimeError):
    """One or more ranks raised (or died); the message has their tracebacks."""


class RankTimeout(RankError, TimeoutError):
    """Some ranks did not finish within the timeout and were killed."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    payload: dict[str, Any]
    try:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=max(1.0, timeout)),
        )
        payload = {"ok": True, "result": fn(*args, **kwargs)}
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        payload = {"ok": False, "traceback": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - already failing or exiting
                pass
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
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="seqpar-ranks-") as tmpdir:
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

        deadline = time.monotonic() + timeout
        failed_at: float | None = None
        timed_out = False
        try:
            while any(p.is_alive() for p in procs):
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
            stragglers = [r for r, p in enumerate(procs) if p.is_alive()]
            for p in procs:
                _kill(p)

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
