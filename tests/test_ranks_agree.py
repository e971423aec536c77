"""Ranks that disagree raise on every rank within seconds, naming what differs (``sp_compiler.agree``).

Each case runs 2 gloo ranks whose calls differ in one thing: the prompt length, the strategy, an option,
the model's layer count, or ``tp_size`` (one rank alone would wait in the collective that makes a
two-level mesh's sub-groups). Without the check these hang until the process group's timeout or abort
inside gloo; here every rank must raise ``RankMismatchError`` well inside the 60 s the test allows.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from models import build_model, make_inputs
from seqpar_testing import cached_run
from sp_compiler.testing import run_ranks

MODEL = dict(heads=4, kv_heads=2, hidden=64)
#: kind -> (what the test expects the message to name)
KINDS = {"length": "tokens per sequence", "strategy": "strategy", "options": "options", "layers": "decoder layers",
         "compile error": "failed to compile", "tp_size": "options"}


def _body(kinds):
    from sp_compiler.agree import RankMismatchError
    from sp_compiler.testing import seqpar_error

    odd = dist.get_rank() == 1
    out = {}
    for kind in kinds:
        torch._dynamo.reset()
        model = build_model("llama", layers=3 if kind == "layers" and odd else 2, **MODEL)
        opts = {"strategy": "vanilla_sp" if kind == "strategy" and odd else "ulysses", "lower": "eager",
                "outputs": "local" if kind == "options" and odd else "replicate",
                "tp_size": 2 if kind == "tp_size" and odd else 1}      # rank 1 would make sub-groups alone
        if kind == "compile error" and odd:
            opts["layers"] = {"model.layers.9": "tp"}         # no such layer: this rank fails to compile
        S = 96 if kind == "length" and odd else 64
        fast = torch.compile(model, backend="seqpar", options=opts)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                fast(make_inputs("llama", 1, S))
            out[kind] = ("ran", "", time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - the test reads it
            err = seqpar_error(e) or e
            out[kind] = (type(err).__name__ if not isinstance(err, RankMismatchError) else "RankMismatchError",
                         str(err), time.perf_counter() - t0)
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_ranks_that_disagree_raise_fast(kind):
    results = cached_run(("disagree",), run_ranks, _body, 2, list(KINDS), timeout=240)
    for rank, res in enumerate(results):
        what, message, seconds = res[kind]
        if kind == "compile error" and rank == 1:
            assert what == "OptionsError", (rank, what, message)           # its own error, after the check
            continue
        assert what == "RankMismatchError", (rank, what, message)
        assert KINDS[kind] in message and "Fix:" in message, message
        assert seconds < 30, f"rank {rank} took {seconds:.1f} s to raise"


def _count_body():
    from sp_compiler.bench import CollectiveCounter

    model = build_model("llama", layers=2, **MODEL)
    ids = make_inputs("llama", 1, 64)
    counts = {}
    for check in (True, False):
        torch._dynamo.reset()
        fast = torch.compile(model, backend="seqpar", options={"strategy": "tp", "lower": "eager",
                                                               "check_ranks": check})
        with torch.no_grad():
            fast(ids, use_cache=False)
            with CollectiveCounter() as c:
                fast(ids, use_cache=False)
        counts[check] = (dict(c.calls), list(c.checks))
    return counts


def test_the_check_is_one_small_all_gather():
    """Per call: exactly one all_gather of the fingerprint (2 ranks x FIELDS int64s arrive) besides the
    graph's own collectives, which it leaves as they were; none with check_ranks=False (counted with the
    bench's dispatch-mode counter, which keeps the check apart)."""
    from sp_compiler.agree import FIELDS

    for counts in run_ranks(_count_body, 2, timeout=240):
        # tp on 2 layers: 2 all_reduce a layer, the vocab-parallel embedding's, the logits' gather
        assert counts[True][0] == counts[False][0] == {"all_reduce": 5, "all_gather": 1}
        assert counts[True][1] == [1, 2 * len(FIELDS) * 8]
        assert counts[False][1] == [0, 0]
