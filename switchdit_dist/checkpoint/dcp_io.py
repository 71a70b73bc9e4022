"""``torch.distributed.checkpoint`` with flat-range entries.

DCP stores a tensor as chunks, each with its offset in the whole tensor, and reads any region of a
tensor from whatever chunks cover it. ZeRO 1/2 gives each rank a flat range of a parameter's
elements that no DTensor placement describes (the ranges follow the flat partition boundaries,
not rows). A ``Range`` says "this local 1-D tensor is elements ``[offset, offset + numel)`` of a
flat entry of ``total`` elements"; the planners below write and read such ranges through DCP's
planner interface (``SavePlanner`` / ``LoadPlanner``), everything else is plain DCP. Entries given
as plain tensors are whole tensors: several ranks may give the same one (replicated weights) and
DCP writes it once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_local_load_plan,
)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from switchdit_dist.errors import UserError

# Warnings that say nothing to a user: DCP's own coordination (all_gather_object) uses a collective
# torch has deprecated; saving and reading in one process (no process group) is intended here.
_NOISE = (
    (r".*all_gather_into_tensor.* is deprecated", FutureWarning),
    (r"torch.distributed is disabled, unavailable or uninitialized", UserWarning),
)
for _message, _category in _NOISE:  # also for the background thread of asynchronous saves
    warnings.filterwarnings("ignore", message=_message, category=_category)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        for message, category in _NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


@dataclass(frozen=True)
class Range:
    offset: int
    total: int


class _RangeSavePlanner(DefaultSavePlanner):
    def __init__(self, ranges: dict[str, Range]):
        super().__init__()
        self.ranges = ranges

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.range_tensors = {k: state_dict[k] for k in self.ranges}
        whole = {k: v for k, v in state_dict.items() if k not in self.ranges}
        super().set_up_planner(whole, storage_meta, is_coordinator)

    def create_local_plan(self):
        plan = super().create_local_plan()
        items = [
            WriteItem(
                index=MetadataIndex(key, torch.Size([where.offset])),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size([where.offset]), sizes=tensor.size()),
                    properties=TensorProperties.create_from_tensor(tensor),
                    size=torch.Size([where.total]),
                ),
            )
            for key, where in self.ranges.items()
            for tensor in [self.range_tensors[key]]
        ]
        self.plan = dataclasses.replace(plan, items=list(plan.items) + items)
        return self.plan

    def resolve_data(self, write_item):
        tensor = self.range_tensors.get(write_item.index.fqn)
        return tensor if tensor is not None else super().resolve_data(write_item)


class _RangeLoadPlanner(DefaultLoadPlanner):
    def __init__(self, ranges: dict[str, Range]):
        super().__init__(flatten_state_dict=False)
        self.ranges = ranges

    def create_local_plan(self):
        whole = {k: v for k, v in self.state_dict.items() if k not in self.ranges}
        plan = create_default_local_load_plan(whole, self.metadata, True)
        items = list(plan.items)
        for key, where in self.ranges.items():
            saved = self.metadata.state_dict_metadata[key]
            chunk = ChunkStorageMetadata(
                offsets=torch.Size([where.offset]), sizes=self.state_dict[key].size()
            )
            items += create_read_items_for_chunk_list(key, saved, [chunk])
        return dataclasses.replace(plan, items=items)

    def lookup_tensor(self, index):
        if index.fqn in self.ranges:
            return self.state_dict[index.fqn]
        return super().lookup_tensor(index)


# What a DCP save or load raises: its CheckpointException (any rank's failure, on every rank) is a
# BaseException, not an Exception, so ``except Exception`` alone lets it through.
ERRORS: tuple[type[BaseException], ...] = (Exception, CheckpointException)


class _Writer(dcp.FileSystemWriter):
    """The file-system writer; for asynchronous saves its staging (a CPU copy of every tensor,
    made before training continues) is DCP's own."""


def save(state: dict[str, torch.Tensor], ranges: dict[str, Range], directory: Path, group=None) -> None:
    """Write ``state`` (collective over ``group``). Raises ``CheckpointException`` on every rank
    when any rank fails."""
    with _quiet():
        dcp.save(
            state,
            storage_writer=_Writer(str(directory)),
            planner=_RangeSavePlanner(ranges),
            process_group=group,
            no_dist=_single_process(),
        )


def async_save(state: dict[str, torch.Tensor], ranges: dict[str, Range], directory: Path, group):
    """Stage ``state`` to CPU memory and write it in the background (DCP's thread executor). Returns
    a future of the write. ``group`` must be a CPU (gloo) group no other thread uses meanwhile."""
    response = dcp.async_save(
        state,
        storage_writer=_Writer(str(directory)),
        planner=_RangeSavePlanner(ranges),
        process_group=group,
        no_dist=_single_process(),
    )
    return getattr(response, "upload_completion", response)  # an AsyncSaveResponse on newer torch


def load(targets: dict[str, torch.Tensor], ranges: dict[str, Range], directory: Path, group=None) -> None:
    """Fill ``targets`` in place (collective over ``group``): whole entries, or for keys in
    ``ranges`` the given range of a flat entry."""
    with _quiet():
        dcp.load(
            targets,
            storage_reader=dcp.FileSystemReader(str(directory)),
            planner=_RangeLoadPlanner(ranges),
            process_group=group,
        )


def _single_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


# --- reading in one process ---------------------------------------------------------------------


@dataclass(frozen=True)
class EntrySpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def read_metadata(directory: Path):
    try:
        return dcp.FileSystemReader(str(directory)).read_metadata()
    except FileNotFoundError:
        raise UserError(f"checkpoint {directory}: .metadata is missing") from None
    except Exception as err:  # a damaged .metadata (UnpicklingError, EOFError, ...)
        raise UserError(
            f"checkpoint {directory}: .metadata is unreadable ({type(err).__name__}: {err})"
        ) from None


def tensor_index(directory: Path) -> dict[str, EntrySpec]:
    """Every tensor entry of the checkpoint with its shape and dtype."""
    out = {}
    for key, md in read_metadata(directory).state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            out[key] = EntrySpec(tuple(md.size), md.properties.dtype)
    return out


def data_files(directory: Path) -> list[str]:
    """The data files DCP wrote (names relative to ``directory``), from its metadata."""
    storage = read_metadata(directory).storage_data or {}
    return sorted({info.relative_path for info in storage.values()})


def read(directory: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """Whole entries ``keys`` in this process (no process group), whatever layout wrote them."""
    index = tensor_index(directory)
    missing = [k for k in keys if k not in index]
    if missing:
        raise UserError(f"checkpoint {directory} lacks {len(missing)} entr(y/ies), e.g. {missing[:3]}")
    out = {k: torch.empty(index[k].shape, dtype=index[k].dtype) for k in keys}
    with _quiet():
        dcp.load(out, storage_reader=dcp.FileSystemReader(str(directory)), no_dist=True)
    return out
