"""A rank's MLP experts as grouped matmuls: one kernel per layer for all its local experts.

The loop in ``ExpertShard`` launches two matmuls per expert and per source rank; on a GPU with many
small experts those launches and their tails dominate. ``torch._grouped_mm`` multiplies the rows of
one [T, D] token matrix, cut at ``offs``, each by its own expert's weight in one kernel (CUTLASS on
Hopper, bf16). It is a private torch op, so everything here goes through :func:`grouped_mm_supported`
and falls back to the loop where it is missing.

Tokens arrive as runs of whole samples ordered by source rank, then by local expert (run ``i``
belongs to local expert ``i % E``). The grouped kernel needs each expert's rows contiguous, so the
runs are put in expert-major order (no copy at EP 1, where the order already is) and put back after.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer would compute ``x`` in here (autocast's, when it is on)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether the grouped kernel beats the loop for ``x``: CUDA, bf16, Hopper or newer (older GPUs
    and other dtypes get torch's reference implementation, a loop itself)."""
    if not (x.is_cuda and hasattr(torch, "_grouped_mm") and compute_dtype(x) == torch.bfloat16):
        return False
    return torch.cuda.get_device_capability(x.device) >= (9, 0)


def expert_major_order(num_runs: int, num_local_experts: int) -> list[int]:
    """Run indices sorted by local expert, then by source rank (stable)."""
    return sorted(range(num_runs), key=lambda i: (i % num_local_experts, i))


def grouped_mlp(blocks: torch.Tensor, chunk_sizes: list[int], experts: nn.ModuleList) -> torch.Tensor:
    """The same as running run ``i`` of ``blocks`` [N, L, D] through ``experts[i % E]``
    (``Linear -> GELU(tanh) -> Linear``), with one grouped matmul per layer.

    Every expert's weights enter the graph, so each gets a gradient (zero when no token reached it),
    as in the loop."""
    n, length, dim = blocks.shape
    num_local = len(experts)
    dtype = compute_dtype(blocks)
    order = expert_major_order(len(chunk_sizes), num_local)
    identity = order == list(range(len(chunk_sizes)))
    if identity:
        x = blocks
    else:
        runs = blocks.split(chunk_sizes)
        x = torch.cat([runs[i] for i in order])
    rows = [0] * num_local
    for i, size in enumerate(chunk_sizes):
        rows[i % num_local] += size * length
    # A host list, known before the step (the dispatch plan): one copy to the device, no sync.
    counts = torch.tensor(rows, dtype=torch.long).to(blocks.device, non_blocking=True)
    offs = counts.cumsum(0).to(torch.int32)  # each expert's end row
    expert_of_row = torch.repeat_interleave(
        torch.arange(num_local, device=blocks.device), counts, output_size=n * length
    )

    def layer(h: torch.Tensor, index: int) -> torch.Tensor:
        weight = torch.stack([e[index].weight for e in experts]).to(dtype)  # [E, out, in]
        bias = torch.stack([e[index].bias for e in experts]).to(dtype)  # [E, out]
        return torch._grouped_mm(h, weight.transpose(1, 2), offs=offs) + bias[expert_of_row]

    h = x.reshape(n * length, dim).to(dtype)
    h = F.gelu(layer(h, 0), approximate="tanh")
    out = layer(h, 2).view(n, length, dim)
    if identity:
        return out
    pieces = out.split([chunk_sizes[i] for i in order])
    position = {run: p for p, run in enumerate(order)}
    return torch.cat([pieces[position[i]] for i in range(len(chunk_sizes))])
