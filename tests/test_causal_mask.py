"""passes/causal_mask: constant causal masks become is_causal, and nothing else does.

Masks are built by small functions of torch ops, traced with fake tensors (so a graph at
S = 16384 costs nothing), and checked against the truth: the same function run for real at a
small S, compared with the causal pattern. Real HuggingFace graphs come from a capture-only
backend (Dynamo + seqpar's ``capture``; the model never runs). One process, no process group.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

from models import build_model, packed_position_ids
from passes.causal_mask import causal_mask, mask_rows
from sp_compiler import sdpa

pytestmark = pytest.mark.usefixtures("dynamo_reset")

NEG = -math.inf
LOWEST = torch.finfo(torch.float32).min       # what HF's eager masks hide keys with: as good as -inf for a
                                              # causal mask (every row sees its own key; the rest get weight 0)


def _ij(S):
    return torch.arange(S)[:, None], torch.arange(S)[None, :]


def _causal(S):
    i, j = _ij(S)
    return j <= i


def _hf_like(S, batch=2, window=None):
    """HuggingFace 5.x's mask under compile: positions from an arange, indexed per query / key,
    packed-document ids from a cumsum, and-ed, expanded over the batch, then where(m, 0, -inf)."""
    pos = torch.arange(S)[None]
    prev = torch.cat([pos[:, :1] - 1, pos], -1)
    doc = torch.cumsum((prev[:, 1:] - prev[:, :-1]) != 1, -1)
    b = torch.arange(1)[:, None, None, None]
    qi, kj = torch.arange(S)[None, None, :, None], torch.arange(S)[None, None, None, :]
    m = pos.new_ones((), dtype=torch.bool) & (pos[b, kj] <= pos[b, qi])
    if window is not None:
        m = m & (pos[b, kj] > pos[b, qi] - window)
    m = m & (doc[b, qi] == doc[b, kj])
    m = m.expand(batch, -1, S, S)
    return torch.where(m, torch.tensor(0.0), torch.tensor(NEG))


def _positions_with_tie(S):
    ar = torch.arange(S)
    return torch.where(ar == 3, 2, ar)                    # 0 1 2 2 4 5 ...: monotone, one tie


TRUE_CAUSAL = {
    "bool le": _causal,
    "bool ge swapped": lambda S: _ij(S)[0] >= _ij(S)[1],
    "float where": lambda S: torch.where(_causal(S), 0.0, NEG),
    "masked_fill of zeros": lambda S: torch.zeros(S, S).masked_fill(_ij(S)[1] > _ij(S)[0], NEG),
    "tril of ones": lambda S: torch.ones(S, S, dtype=torch.bool).tril(),
    "not triu": lambda S: ~torch.ones(S, S, dtype=torch.bool).triu(1),
    "hf like": _hf_like,
    "hf like, window wider than S": lambda S: _hf_like(S, window=2 * S),
    "decreasing keys": lambda S: (S - _ij(S)[1]) >= (S - _ij(S)[0]),
    "sliced from a longer mask": lambda S: torch.where(_causal(2 * S), 0.0, NEG)[:S, :S],
    "sum of two additive masks": lambda S: torch.where(_causal(S), 0.0, NEG) + torch.where(_causal(S), 0.0, NEG),
    "the dtype's lowest instead of -inf": lambda S: torch.where(_causal(S), 0.0, LOWEST),   # HF's eager masks
}

NEAR_CAUSAL = {
    "one entry above the diagonal": lambda S: _causal(S) | ((_ij(S)[0] == 2) & (_ij(S)[1] == 3)),
    "one entry far above": lambda S: _causal(S) | ((_ij(S)[0] == 2) & (_ij(S)[1] == 5)),
    "one entry below dropped": lambda S: _causal(S) & ~((_ij(S)[0] == 5) & (_ij(S)[1] == 2)),
    "diagonal entry dropped": lambda S: _causal(S) & ~((_ij(S)[0] == 3) & (_ij(S)[1] == 3)),
    "sliding window": lambda S: _causal(S) & (_ij(S)[1] > _ij(S)[0] - 4),
    "hf sliding window": lambda S: _hf_like(S, window=4),
    "diagonal + 1": lambda S: _ij(S)[1] <= _ij(S)[0] + 1,
    "strictly below": lambda S: _ij(S)[1] < _ij(S)[0],
    "diagonal - 1 via tril": lambda S: torch.ones(S, S, dtype=torch.bool).tril(-1),
    "anti-causal": lambda S: _ij(S)[1] >= _ij(S)[0],
    "last row empty": lambda S: _causal(S) & (_ij(S)[0] < S - 1),
    "first key dropped": lambda S: _causal(S) & (_ij(S)[1] > 0),
    "-1e9 instead of -inf": lambda S: torch.where(_causal(S), 0.0, -1e9),
    "1 instead of 0": lambda S: torch.where(_causal(S), 1.0, NEG),
    "bool cast to float": lambda S: _causal(S).float(),
    "inverted float": lambda S: torch.where(_causal(S), NEG, 0.0),
    "positions with a tie": lambda S: _positions_with_tie(S)[None, :] <= _positions_with_tie(S)[:, None],
    "permuted positions": lambda S: ((_ij(S)[1] * 7) % S) <= ((_ij(S)[0] * 7) % S),
    "per-batch offset": lambda S: _ij(S)[1] <= _ij(S)[0] + torch.arange(2)[:, None, None, None],
    "all keys": lambda S: torch.ones(S, S, dtype=torch.bool),
    "no keys past 4": lambda S: _causal(S) & (_ij(S)[1] < 4),
}


def _truth(m: torch.Tensor, S: int) -> bool:
    """Is ``m`` (run for real) exactly the causal mask of SDPA: bool True / float 0 on and below the
    diagonal, bool False / float -inf (or the lowest float) above, for every batch row?"""
    allowed = torch.ones(S, S, dtype=torch.bool).tril().expand(m.shape)
    if m.dtype == torch.bool:
        return bool((m == allowed).all())
    return bool((m[allowed] == 0).all()) and bool((m[~allowed] <= LOWEST).all())


def _graph(mask_fn, S, extra=()):
    def fn(q, k, v, *xs):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_fn(S, *xs))
    q = torch.zeros(2, 1, S, 4)
    return make_fx(fn, tracing_mode="fake")(q, q, q, *extra)


def _attention(gm):
    (node,) = [n for n in gm.graph.nodes if sdpa.is_attention(n)]
    return node


def _verdict(gm) -> bool:
    causal_mask(gm, None)
    c = sdpa.bind(_attention(gm))
    assert c.is_causal == (c.mask is None)
    return c.is_causal


class _Biggest(TorchDispatchMode):
    """Records the biggest storage (bytes) behind any tensor an ATen op returns while it is active
    (a broadcast view of a small tensor counts as the small tensor: it allocates nothing)."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.nbytes = max(self.nbytes, o.untyped_storage().nbytes())
        return out


# ----------------------------------------------------------------------------- built masks

@pytest.mark.parametrize("S", (8, 64))
@pytest.mark.parametrize("name", sorted(TRUE_CAUSAL))
def test_causal_masks_become_is_causal(name, S):
    fn = TRUE_CAUSAL[name]
    assert _truth(fn(S), S), "the test's own mask is not causal"
    assert _verdict(_graph(fn, S)), name


@pytest.mark.parametrize("S", (8, 64))
@pytest.mark.parametrize("name", sorted(NEAR_CAUSAL))
def test_near_causal_masks_stay_masks(name, S):
    fn = NEAR_CAUSAL[name]
    assert not _truth(fn(S), S), "the test's own mask is causal"
    assert not _verdict(_graph(fn, S)), name


@pytest.mark.parametrize("name", sorted(TRUE_CAUSAL) + sorted(NEAR_CAUSAL))
def test_is_causal_mask_on_the_mask_itself(name):
    """Without SDPA's CPU decomposition in between (it turns bool masks into float ones): bool
    masks are judged as bool."""
    from passes.causal_mask import is_causal_mask

    S = 64
    fn = {**TRUE_CAUSAL, **NEAR_CAUSAL}[name]
    gm = make_fx(lambda x: fn(S) & x if fn(4).dtype == torch.bool else fn(S) + x, tracing_mode="fake")(
        torch.tensor(True) if fn(4).dtype == torch.bool else torch.tensor(0.0))
    out = next(iter(n for n in gm.graph.nodes if n.op == "output")).args[0]
    mask = out.args[0]                                  # the mask, before it meets the input
    assert is_causal_mask(gm, mask) == _truth(fn(S), S)


def test_a_broadcast_single_entry_is_no_causal_mask():
    gm = _graph(lambda S: torch.zeros(1, 1), 16)
    assert not _verdict(gm)


def test_mask_from_a_graph_input_stays():
    pad = torch.ones(64, dtype=torch.bool)
    gm = _graph(lambda S, p: _causal(S) & p[None, :], 64, extra=(pad,))
    assert not _verdict(gm)


@pytest.mark.parametrize("name", ["hf like", "tril of ones", "masked_fill of zeros", "decreasing keys"])
def test_causal_at_16k_builds_no_s_by_s_tensor(name):
    S = 16384
    gm = _graph(TRUE_CAUSAL[name], S)
    with _Biggest() as seen:
        assert _verdict(gm)
    assert seen.nbytes <= 64 * S, f"a tensor of {seen.nbytes} bytes (S*S = {S * S})"


@pytest.mark.parametrize("name", ["hf sliding window", "one entry above the diagonal", "diagonal + 1",
                                  "positions with a tie"])
def test_near_causal_at_16k_stays_and_builds_no_s_by_s_tensor(name):
    S = 16384
    gm = _graph(NEAR_CAUSAL[name], S)
    with _Biggest() as seen:
        assert not _verdict(gm)
    assert seen.nbytes <= 64 * S


def test_rows_are_exact_for_a_sliding_window():
    S, w = 64, 4
    gm = _graph(lambda S: _hf_like(S, window=w), S)
    rows = mask_rows(gm, sdpa.bind(_attention(gm)).mask)
    i = torch.arange(S)
    assert rows.additive and rows.shape == (2, 1, S, S)
    assert bool((rows.lo == (i - w + 1).clamp(min=0)).all()) and bool((rows.hi == i + 1).all())


# ----------------------------------------------------------------------------- HuggingFace graphs

class _Captured(Exception):
    pass


def _capture(family, S, **inputs):
    """The ATen graph seqpar's ``capture`` makes of one prefill; the model itself never runs."""
    from passes.capture import capture

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(capture(gm, list(example_inputs)))
        raise _Captured

    overrides = inputs.pop("config", {})
    model = build_model(family, layers=1, **overrides)
    ids = torch.zeros(1, S, dtype=torch.long)
    with torch.no_grad(), pytest.raises(Exception) as info:
        torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False, **inputs)
    assert graphs, f"nothing captured: {info.value}"
    return graphs[0]


def _attention_nodes(gm):
    return [n for n in gm.graph.nodes if sdpa.is_attention(n)]


@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_hf_default_mask_becomes_is_causal(family):
    gm = _capture(family, 32)
    assert all(sdpa.bind(n).mask is not None for n in _attention_nodes(gm))
    causal_mask(gm, None)
    assert all(sdpa.bind(n).is_causal and sdpa.bind(n).mask is None for n in _attention_nodes(gm))


def test_hf_llama_at_16k_is_causal_without_an_s_by_s_tensor():
    S = 16384
    gm = _capture("llama", S)
    with _Biggest() as seen:
        causal_mask(gm, None)
    assert all(sdpa.bind(n).is_causal for n in _attention_nodes(gm))
    assert seen.nbytes <= 64 * S, seen.nbytes


@pytest.mark.parametrize("case", ["mistral window 4", "attention_mask", "padding", "position_ids",
                                  "packed position_ids"])
def test_hf_masks_that_are_not_constant_causal_stay(case):
    S = 32
    inputs = {
        "mistral window 4": {"config": {"sliding_window": 4}},
        "attention_mask": {"attention_mask": torch.ones(1, S, dtype=torch.long)},
        "padding": {"attention_mask": torch.cat([torch.zeros(1, 3), torch.ones(1, S - 3)], 1).long()},
        "position_ids": {"position_ids": torch.arange(S)[None]},
        "packed position_ids": {"position_ids": packed_position_ids(1, [S // 2, S // 2])},
    }[case]
    family = "mistral" if case.startswith("mistral") else "llama"
    gm = _capture(family, S, **inputs)
    causal_mask(gm, None)
    nodes = _attention_nodes(gm)
    assert nodes and all(not sdpa.bind(n).is_causal and sdpa.bind(n).mask is not None for n in nodes)


def test_hf_mistral_window_wider_than_the_prompt_is_causal():
    gm = _capture("mistral", 32, config={"sliding_window": 64})
    causal_mask(gm, None)
    assert all(sdpa.bind(n).is_causal for n in _attention_nodes(gm))
