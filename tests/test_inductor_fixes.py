"""``passes.lower.inductor_cpu_fixes``: torch 2.13's Inductor CPU tail-store bug (pytorch issue 196681,
docs/inductor_cpu_bug.md) does not reach code compiled inside it.

The reproducer from that issue, compiled by Inductor inside the fixes, equals eager (torch 2.13 alone is
off by 20.2 on this machine and writes past its output buffer); the fixes leave Inductor as they found it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from passes.lower import inductor_cpu_fixes


def _repro(x):
    v = (x * 0.5) * (torch.erf(x * 0.7071067811865476) + 1)     # GELU, x channels_last
    p = F.pad(v.permute(3, 2, 1, 0), (0, 0, 0, 58), value=0.5)   # (66, 66, 66, 1)
    q = F.pad(v, (0, 0, 0, 0, 0, 58), value=0.5)                 # (1, 66, 66, 66)
    return torch.matmul(q, p)


def test_tail_store_bug_is_worked_around():
    from torch._inductor.codegen.cpp import TilingSelect

    before = TilingSelect.select_tiling
    torch.manual_seed(0)
    x = torch.randn(1, 8, 66, 66).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    with inductor_cpu_fixes():
        got = torch.compile(_repro, backend="inductor")(x)
    torch._dynamo.reset()
    torch.testing.assert_close(got, _repro(x), atol=1e-4, rtol=1e-4)
    assert TilingSelect.select_tiling is before
