"""Pytest setup: make the repository root importable (normally ``pip install -e .`` does), the
``--full`` option (the gloo matrices in their full size, ``seqpar_testing.FULL``), and pooled gloo
ranks (``SEQPAR_RANK_POOL=1`` unless set: ``run_ranks`` keeps its N processes between calls;
``SEQPAR_RANK_POOL=0`` starts fresh ones every call), and seqpar's graph cache off unless set
(``SEQPAR_GRAPH_CACHE=0``: a test that compiles what an earlier one did still runs every pass)."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


# ----------------------------------------------------------------------------- shared fixtures

import pytest  # noqa: E402
import torch  # noqa: E402

__all__ = ["dynamo_reset", "fake_pg"]


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="run the gloo matrices in full (every family x strategy x case; about an hour on 2 "
                          "cores) instead of CI's cut (under 15 minutes); same as SEQPAR_FULL=1")


def pytest_configure(config):
    os.environ.setdefault("SEQPAR_RANK_POOL", "1")   # read by sp_compiler.testing.run_ranks
    os.environ.setdefault("SEQPAR_GRAPH_CACHE", "0")  # every test runs the passes (test_graph_cache: on)
    if config.getoption("--full"):
        os.environ["SEQPAR_FULL"] = "1"      # read by seqpar_testing when the test modules import it


def pytest_report_header(config):
    size = "full gloo matrices" if os.environ.get("SEQPAR_FULL") == "1" else \
        "CI's gloo matrices (--full for all of them)"
    ranks = "pooled ranks" if os.environ.get("SEQPAR_RANK_POOL") == "1" else "fresh ranks per call"
    return f"seqpar: {size}, {ranks}"


@pytest.fixture
def dynamo_reset():
    """The test starts and ends with empty Dynamo caches (compiles never leak between tests).
    Use per module: ``pytestmark = pytest.mark.usefixtures("dynamo_reset")``."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def fake_pg():
    """Factory: ``fake_pg(world, rank=0)`` initialises a fake process group (no communication);
    it is destroyed when the test ends, whatever happens."""
    import torch.distributed as dist

    from sp_compiler.testing import init_fake_pg

    def start(world: int, rank: int = 0):
        init_fake_pg(world, rank)

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()
