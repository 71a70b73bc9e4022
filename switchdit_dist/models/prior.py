"""Switch-DiT's diffusion prior loss.

Units are the N*E experts of all N blocks. For every timestep t the model's *gate pattern* is
the 0/1 top-k pattern of every block ([T, N*E]); the *prior* is a fixed [T, N*E] table whose row
t holds a window of N*k consecutive ones starting at ``round((t/(T-1))^4 * (N*E - N*k))`` (the
sliding window of Denoising Task Routing). Each step, model units are matched one-to-one to prior
units by the Hungarian algorithm on ``cost[i, j] = sum_t |pattern[t, i] - prior[t, j]|`` (units
randomly permuted on both sides first, so ties break differently from step to step), and the loss
is the Jensen-Shannon divergence between each sample's gate distribution (all blocks' softmax
concatenated, divided by N) and its timestep's prior row, normalised to sum 1, over the matched
units; averaged over the batch.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

JSD_EPS = 1e-6


def prior_table(num_timesteps: int, num_blocks: int, num_experts: int, top_k: int) -> np.ndarray:
    """[T, N*E] float32 table of 0/1."""
    units, window = num_blocks * num_experts, num_blocks * top_k
    t = np.arange(num_timesteps, dtype=np.float64)
    starts = np.round((t / (num_timesteps - 1)) ** 4 * (units - window)).astype(np.int64)
    table = np.zeros((num_timesteps, units), dtype=np.float32)
    for row, start in enumerate(starts):
        table[row, start : start + window] = 1.0
    return table


def topk_pattern(gate_probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T, N, E] probabilities -> [T, N*E] 0/1 pattern of each block's top-k."""
    index = gate_probs.topk(top_k, dim=-1).indices
    pattern = torch.zeros_like(gate_probs).scatter_(-1, index, 1.0)
    return pattern.flatten(1)


def matching_cost(pattern: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """cost[i, j] = sum_t |pattern[t, i] - prior[t, j]| for 0/1 tables, as two matrix products."""
    pattern = pattern.astype(np.float64)
    prior = prior.astype(np.float64)
    return pattern.T @ (1.0 - prior) + (1.0 - pattern).T @ prior


def match_units(pattern: np.ndarray, prior: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``assignment[i]`` = prior unit matched to model unit i (minimum total cost)."""
    cost = matching_cost(pattern, prior)
    n = cost.shape[0]
    perm_model, perm_prior = rng.permutation(n), rng.permutation(n)
    rows, cols = linear_sum_assignment(cost[np.ix_(perm_model, perm_prior)])
    assignment = np.empty(n, dtype=np.int64)
    assignment[perm_model[rows]] = perm_prior[cols]
    return assignment


def jensen_shannon(p: torch.Tensor, q: torch.Tensor, eps: float = JSD_EPS) -> torch.Tensor:
    """Row-wise JSD of distributions [B, U]; eps is added to both before the logs."""
    p, q = p + eps, q + eps
    m = 0.5 * (p + q)
    return 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)


class DiffusionPriorLoss:
    def __init__(self, num_blocks: int, num_experts: int, top_k: int, num_timesteps: int = 1000):
        self.num_blocks, self.num_experts, self.top_k = num_blocks, num_experts, top_k
        self.num_timesteps = num_timesteps
        self.prior = prior_table(num_timesteps, num_blocks, num_experts, top_k)

    def __call__(
        self,
        sample_gates: torch.Tensor,
        t: torch.Tensor,
        all_timestep_gates: torch.Tensor,
        rng: np.random.Generator,
    ) -> torch.Tensor:
        """sample_gates: [B, N, E] (with grad); t: [B]; all_timestep_gates: [T, N, E] (no grad)."""
        pattern = topk_pattern(all_timestep_gates.detach().float(), self.top_k).cpu().numpy()
        assignment = match_units(pattern, self.prior, rng)
        target = torch.from_numpy(self.prior[:, assignment]).to(sample_gates.device)[t.long()]
        target = target / target.sum(-1, keepdim=True)
        gate_dist = sample_gates.float().flatten(1) / self.num_blocks
        return jensen_shannon(gate_dist, target).mean()
