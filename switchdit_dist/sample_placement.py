"""``parallel.placement``: which rank trains which of the global batch's timesteps.

A Switch-DiT sample's route is fixed once its timestep is drawn, and the router is replicated, so
every rank can compute, from the shared seed and without communication, every slot's timesteps
and where each would send its tokens. ``random`` keeps each slot's own draw. ``route_aware``
re-deals the same timesteps over the slots so that samples sit on the expert-parallel rank that
holds most of their experts, with the same number of samples per rank as before. The global
batch's timesteps (a multiset) are unchanged, and so is the loss's expectation: the data samples
and the noise stay where they were, and the timesteps are independent of both.

Expert-parallel groups are ``ep_size`` consecutive ranks; expert ``e`` lives on EP rank
``e // num_local``. A sample on EP rank ``r`` sends one [L, D] block per (block, slot) pair whose
expert is elsewhere: that count is its cost there.

The assignment is greedy by regret (samples whose best EP rank is most clearly better choose
first, ties by position), filling each EP rank's capacity; for ``ep_size == 2`` that is the
optimum. Written here because no library assigns with capacities this small a problem.
"""

from __future__ import annotations

import numpy as np
import torch

from switchdit_dist.train.seeding import derive_seed

PLACEMENTS = ("random", "route_aware")


def slot_timesteps(seed: int, step: int, slots: int, batch: int, num_timesteps: int) -> torch.Tensor:
    """[slots, batch] timesteps each slot (rank x accumulation + micro-step) draws first from its
    generator (``train.step.draw``), computed here for all slots of the global batch."""
    out = torch.empty(slots, batch, dtype=torch.long)
    for slot in range(slots):
        generator = torch.Generator().manual_seed(derive_seed(seed, step, slot))
        out[slot] = torch.randint(0, num_timesteps, (batch,), generator=generator)
    return out


def owner_table(route_table: torch.Tensor, num_local: int) -> np.ndarray:
    """[T, depth * k] EP rank of every (block, slot) expert of each timestep, from the router's
    [T, depth, k] expert ids."""
    return (route_table.reshape(route_table.shape[0], -1) // num_local).numpy()


def _slot_ep_ranks(slots: int, accum: int, ep_size: int) -> np.ndarray:
    """The EP rank of each slot's rank (slot = rank x accum + micro; EP groups are consecutive ranks)."""
    return (np.arange(slots) // accum) % ep_size


def leaving_pairs(timesteps: torch.Tensor, owners: np.ndarray, ep_size: int, accum: int) -> int:
    """(sample, block, slot) pairs of [slots, batch] ``timesteps`` whose expert is on another EP
    rank: the token blocks dispatch sends away (and combine brings back)."""
    ep_rank = _slot_ep_ranks(timesteps.shape[0], accum, ep_size)
    return int((owners[timesteps.numpy()] != ep_rank[:, None, None]).sum())


def _costs(flat: np.ndarray, owners: np.ndarray, ep_size: int) -> np.ndarray:
    """[n, ep_size]: the pairs sample n (timestep ``flat[n]``) would send away from each EP rank."""
    return np.stack([(owners[flat] != r).sum(1) for r in range(ep_size)], axis=1)


def fewest_leaving_pairs(timesteps: torch.Tensor, owners: np.ndarray, ep_size: int) -> int:
    """The least any placement of these timesteps could send if the ranks' sample counts were free:
    every sample on its own cheapest EP rank. What is left is the routes' doing (a sample whose
    experts are spread over ranks sends from anywhere), not the deal's."""
    return int(_costs(timesteps.reshape(-1).numpy(), owners, ep_size).min(1).sum())


def route_aware(timesteps: torch.Tensor, owners: np.ndarray, ep_size: int, accum: int) -> torch.Tensor:
    """The same timesteps re-dealt over the [slots, batch] positions (slot = rank x accum + micro)
    so that each sample lands on an EP rank holding most of its experts; every position keeps
    one timestep."""
    slots, batch = timesteps.shape
    flat = timesteps.reshape(-1).numpy()
    ep_of_position = np.repeat(_slot_ep_ranks(slots, accum, ep_size), batch)
    cost = _costs(flat, owners, ep_size)
    capacity = np.bincount(ep_of_position, minlength=ep_size)
    ordered = np.sort(cost, axis=1)
    regret = ordered[:, 1] - ordered[:, 0] if ep_size > 1 else np.zeros(len(flat), dtype=np.int64)
    choice = np.empty(len(flat), dtype=np.int64)
    for n in np.lexsort((np.arange(len(flat)), -regret)):  # largest regret first, then position
        for r in np.lexsort((np.arange(ep_size), cost[n])):  # cheapest EP rank with room
            if capacity[r]:
                capacity[r] -= 1
                choice[n] = r
                break
    placed = np.empty_like(flat)
    for r in range(ep_size):  # each EP rank's samples fill its positions, both in order
        placed[ep_of_position == r] = flat[choice == r]
    return torch.from_numpy(placed).view(slots, batch)
