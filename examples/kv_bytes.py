"""K/V bytes each attention call reads per rank, with HF's repeat_kv copy and with ``passes/grouped_kv``.

    python examples/kv_bytes.py [--seq-len 32768] [--world-size 2]

Transforms one decoder layer of a Llama with Llama-3-8B's head ratio (32 query heads, 8 KV heads,
head_dim 16) on a fake process group (``plan.transform``: nothing is computed) and sums the K and V
tensors attention reads, before any row slice a pass takes of them (docs/long_prompts.md).
"""
from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig

import passes
from sp_compiler import sdpa
from sp_compiler.plan import transform


def kv_read(config, strategy: str, world: int, seq_len: int) -> dict:
    """{node: shape} of the K and V tensors the attention calls of rank 0 read."""
    gm, _ = transform(config, strategy=strategy, world=world, seq_len=seq_len, layers=1)
    read = {}
    for n in gm.graph.nodes:
        if sdpa.is_attention(n):
            call = sdpa.bind(n)
            for x in (call.k, call.v):
                while x.target == torch.ops.aten.slice.Tensor:
                    x = x.args[0]
                read[x.name] = x.meta["val"]
    return read


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--world-size", type=int, default=2)
    args = p.parse_args()
    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=args.seq_len,
                         attn_implementation="sdpa")
    for grouped in (False, True):
        if grouped:
            passes.PIPELINE.insert(passes.PIPELINE.index(passes.kv_attention), passes.grouped_kv)
        else:
            passes.PIPELINE.remove(passes.grouped_kv)
        for strategy in ("ulysses", "vanilla_sp_zigzag"):
            read = kv_read(config, strategy, args.world_size, args.seq_len)
            mib = sum(v.numel() * v.element_size() for v in read.values()) / 2**20
            shapes = ", ".join(str(tuple(v.shape)) for v in read.values())
            print(f"{strategy:18s} {'grouped' if grouped else 'repeat_kv':9s} {mib:6.0f} MiB  {shapes}")


if __name__ == "__main__":
    main()
