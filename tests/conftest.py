"""Pytest setup: make the repository root importable (normally ``pip install -e .`` does)."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


# ----------------------------------------------------------------------------- shared fixtures

import pytest  # noqa: E402
import torch  # noqa: E402

__all__ = ["dynamo_reset", "fake_pg"]


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
