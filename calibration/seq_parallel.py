"""Compressed layers under sequence parallelism: the token dimension sharded over ranks.

Engines that run LTX-2 on several GPUs (xDiT's USP, Raylight, SGLang, vLLM-Omni) split the
tokens of one sample over the ranks. Everything in a DiT block except attention is token-local,
and so are the pack's compressed linears and FFNs: the activation's FP8 scale is per token and
the FFN's hidden scale is static (calibrated), so a shard of tokens gives the same rows as the
whole sequence would. Attention needs every token: Ulysses (DeepSpeed-Ulysses, as in USP)
trades the token split for a head split with one all-to-all before attention and one after.

These helpers are that much and no more (no ring attention, no uneven shards, no engine):
shard / gather along the token dimension and `ulysses_attention`. tests/test_distributed.py
runs a small transformer block with compressed linears and FFN on 2 and 4 ranks (gloo) against
one process; bench/multi_gpu.py runs the FFN at LTX-2 size on 2 GPUs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as Fn


def _rank_world(group):
    return dist.get_rank(group), dist.get_world_size(group)


def shard(x: torch.Tensor, dim: int = 1, group=None) -> torch.Tensor:
    """This rank's contiguous slice of x along dim (tokens); the length must divide evenly."""
    rank, world = _rank_world(group)
    if x.shape[dim] % world:
        raise ValueError(f"{x.shape[dim]} tokens do not split evenly over {world} ranks; pad the sequence")
    return x.chunk(world, dim)[rank].contiguous()


def gather(x: torch.Tensor, dim: int = 1, group=None) -> torch.Tensor:
    """Every rank's shard, concatenated along dim in rank order (all_gather)."""
    _, world = _rank_world(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim)


def seq_to_heads(x: torch.Tensor, group=None) -> torch.Tensor:
    """[B, S/P, H, D] (a token shard, every head) -> [B, S, H/P, D] (every token, a head shard)."""
    _, world = _rank_world(group)
    b, s, h, d = x.shape
    if h % world:
        raise ValueError(f"{h} heads do not split evenly over {world} ranks (Ulysses needs heads % ranks == 0)")
    send = x.reshape(b, s, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()  # [P(dest), B, s, h/P, D]
    recv = torch.empty_like(send)  # [P(source: its token shard), B, s, h/P, D]
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 0, 2, 3, 4).reshape(b, world * s, h // world, d)


def heads_to_seq(x: torch.Tensor, group=None) -> torch.Tensor:
    """The inverse: [B, S, H/P, D] -> [B, S/P, H, D]."""
    _, world = _rank_world(group)
    b, s_all, hp, d = x.shape
    s = s_all // world
    send = x.reshape(b, world, s, hp, d).permute(1, 0, 2, 3, 4).contiguous()  # [P(dest: its tokens), B, s, h/P, D]
    recv = torch.empty_like(send)  # [P(source: its heads), B, s, h/P, D]
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s, world * hp, d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention on [B, S, H, D] (torch's SDPA)."""
    o = Fn.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, attn=attention) -> torch.Tensor:
    """Attention over the whole sequence from token shards q, k, v [B, S/P, H, D]: all-to-all to
    head shards, attn on every token of H/P heads, all-to-all back. Returns [B, S/P, H, D]."""
    q, k, v = (seq_to_heads(t, group) for t in (q, k, v))
    return heads_to_seq(attn(q, k, v), group)
