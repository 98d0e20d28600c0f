"""DTensor state at the edge: local shards and layout records out, live DTensors filled back in.

Saving: :func:`to_records` replaces every DTensor of a captured state by its
layout record (:mod:`.sharded`): this rank's local shard and where it sits.

Loading writes into the live DTensors: for each record of a saved entry,
:func:`resolve` finds the DTensor it belongs to, in the live object's
``state_dict()`` (an FSDP2 model's parameters; an optimizer's existing state)
or, for optimizer state not created yet, beside the parameter it belongs to
(AdamW's ``exp_avg`` of parameter ``i`` is laid out as parameter ``i``). A
``fill`` callback writes the values into that DTensor's local tensor, and the
entry is then loaded with DTensors in place of the records. The model must
already be ``fully_shard``-ed: a record whose live counterpart is a plain
tensor is a :class:`~.storage.CheckpointError` saying so.

Example::

    >>> # xdoctest: +SKIP("needs a process group and an FSDP2 model")
    >>> payload = to_records(model.state_dict())            # {"0.weight": {"__dtensor__": ..., "local": ...}}
    >>> tree = resolve(model, payload, "model", copy_own)    # fills the live parameters
    >>> model.load_state_dict(tree)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..sharding import Mesh, Slice, check_placements, local_slice
from .sharded import ShardLayout, is_record, parse_record
from .storage import CheckpointError

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch builds without distributed
    DTensor = None  # type: ignore[assignment,misc]

Path = tuple[Any, ...]


def is_dtensor(value: Any) -> bool:
    return DTensor is not None and isinstance(value, DTensor)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def layout_of(tensor: Any, name: str = "tensor") -> ShardLayout:
    """This rank's layout of ``tensor`` (a DTensor); ``TypeError`` for a ``Partial`` or strided placement."""
    device_mesh = tensor.device_mesh
    mesh = Mesh.from_ranks(device_mesh.mesh.tolist(), device_mesh.mesh_dim_names)
    placements = check_placements(name, tuple(tensor.shape), mesh, tensor.placements)
    box = local_slice(tuple(tensor.shape), mesh, placements, _rank())
    local_shape = tuple(tensor.to_local().shape)
    if local_shape != box.size:
        raise TypeError(f"{name}: its local shard has shape {list(local_shape)}, but {', '.join(placements)} over {mesh.describe()} gives {list(box.size)}")
    return ShardLayout(tuple(tensor.shape), box, mesh, placements)


def to_records(value: Any, path: str = "") -> Any:
    """``value`` with each DTensor replaced by its layout record (the local shard beside it); no copies."""
    if is_dtensor(value):
        return layout_of(value, path or "tensor").record(value.to_local().detach())
    if isinstance(value, dict):
        return {k: to_records(v, f"{path}/{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [to_records(v, f"{path}/{i}") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    return value


def holds_records(value: Any) -> bool:
    """Whether a decoded tree holds any layout record."""
    return bool(records_in(value))


def holds_dtensors(state: Mapping[str, Any]) -> bool:
    """Whether the live ``state`` (modules, optimizers, plain values) holds a DTensor."""
    for obj in state.values():
        if isinstance(obj, torch.nn.Module):
            tensors: Any = obj.parameters()
        elif isinstance(obj, torch.optim.Optimizer):
            tensors = (p for group in obj.param_groups for p in group["params"])
        else:
            tensors = [obj]
        if any(is_dtensor(t) for t in tensors):
            return True
    return False


# -- loading into live DTensors ----------------------------------------------------


@dataclass
class Target:
    """The live DTensor a saved record loads into, and this rank's box of it."""

    dtensor: Any
    box: Slice
    created: bool  # optimizer state made here, beside its parameter

    @property
    def local(self) -> torch.Tensor:
        return self.dtensor.to_local()


def _shown(path: Path) -> str:
    return "/".join(map(str, path))


def _live_at(tree: Any, path: Path) -> Any:
    for key in path:
        if isinstance(tree, Mapping) and key in tree:
            tree = tree[key]
        elif isinstance(tree, (list, tuple)) and isinstance(key, int) and 0 <= key < len(tree):
            tree = tree[key]
        else:
            return None
    return tree


def _locate(obj: Any, live: Any, path: Path, record: dict, where: str) -> tuple[Any, bool]:
    """The live DTensor at ``path``, or (optimizer state not made yet) the parameter it will sit beside."""
    tensor = _live_at(live, path)
    if not is_dtensor(tensor) and tensor is None and isinstance(obj, torch.optim.Optimizer) and len(path) == 3 and path[0] == "state":
        params = [p for group in obj.param_groups for p in group["params"]]
        param = params[path[1]] if isinstance(path[1], int) and 0 <= path[1] < len(params) else None
        if is_dtensor(param):
            return param, False
    saved_shape = record.get("global_shape")
    if not is_dtensor(tensor):
        now = "nothing" if tensor is None else f"a plain {type(tensor).__name__}"
        raise CheckpointError(
            f"{where}: {_shown(path)} was saved sharded (global shape {saved_shape}) but the live state holds {now} there: "
            "the model must already be sharded when loading a sharded checkpoint: call fully_shard(model, mesh=...) "
            "(and build the optimizer over its parameters) before loading"
        )
    if list(tensor.shape) != saved_shape:
        raise CheckpointError(f"{where}: {_shown(path)} has global shape {list(tensor.shape)} in the live state but {saved_shape} in the checkpoint")
    return tensor, True


def _target(obj: Any, live: Any, path: Path, record: dict, where: str) -> Target:
    tensor, exists = _locate(obj, live, path, record, where)
    box = layout_of(tensor, _shown(path)).box
    if not exists:  # beside its parameter, in the saved dtype (the optimizer casts it on load)
        local = torch.empty(box.size, dtype=record["local"].dtype, device=tensor.to_local().device)
        tensor = DTensor.from_local(local, tensor.device_mesh, tensor.placements, run_check=False, shape=tensor.shape, stride=tensor.stride())
    return Target(tensor, box, not exists)


def _sharded_live(obj: Any, live: Any, path: Path) -> bool:
    """Whether the live state holds (or, for optimizer state, will hold) a DTensor at ``path``."""
    tensor = _live_at(live, path)
    if tensor is None and isinstance(obj, torch.optim.Optimizer) and len(path) == 3 and path[0] == "state":
        params = [p for group in obj.param_groups for p in group["params"]]
        tensor = params[path[1]] if isinstance(path[1], int) and 0 <= path[1] < len(params) else None
    return is_dtensor(tensor)


def into_live(obj: Any, value: Any, entry: str, fill: Fill | None = None) -> Any:
    """A saved entry ready for ``obj.load_state_dict``: records (and whole tensors where ``obj`` is sharded)
    written into ``obj``'s DTensors by ``fill`` (default :func:`copy_own`); ``value`` itself when nothing is sharded."""
    if not holds_records(value) and not holds_dtensors({entry: obj}):
        return value
    return resolve(obj, value, entry, fill or copy_own("loading"))


def live_boxes(obj: Any, saved: Any, entry: str, where: str = "loading") -> dict[Path, Slice]:
    """This rank's live box of each record's tensor in ``saved`` (nothing is allocated), keyed ``(entry, *path)``."""
    live = obj.state_dict() if callable(getattr(obj, "state_dict", None)) else obj
    out: dict[Path, Slice] = {}
    for path, record in records_in(saved):
        tensor, _ = _locate(obj, live, path, record, f"{where}: entry {entry!r}")
        out[(entry, *path)] = layout_of(tensor, _shown(path)).box
    return out


def records_in(tree: Any, path: Path = ()) -> list[tuple[Path, dict]]:
    """Every layout record in a decoded tree, with its path."""
    if is_record(tree):
        return [(path, tree)]
    if isinstance(tree, dict):
        return [found for k, v in tree.items() for found in records_in(v, (*path, k))]
    if isinstance(tree, (list, tuple)):
        return [found for i, v in enumerate(tree) for found in records_in(v, (*path, i))]
    return []


Fill = Callable[[Path, dict, Target], None]


def resolve(obj: Any, saved: Any, entry: str, fill: Fill, where: str = "loading") -> Any:
    """``saved`` (a decoded entry) with each record replaced by the live DTensor ``fill`` wrote into.

    ``obj`` is the live entry (a module, an optimizer, a plain value);
    ``fill((entry, *path), record, target)`` writes the record's values into ``target.local``.
    """
    live = obj.state_dict() if callable(getattr(obj, "state_dict", None)) else obj

    def walk(node: Any, path: Path) -> Any:
        if is_record(node):
            target = _target(obj, live, path, node, f"{where}: entry {entry!r}")
            with torch.no_grad():
                fill((entry, *path), node, target)
            return target.dtensor
        if isinstance(node, torch.Tensor) and node.ndim and _sharded_live(obj, live, path):
            # Saved whole (unsharded): this rank's box of it.
            target = _target(obj, live, path, {"global_shape": list(node.shape), "local": node}, f"{where}: entry {entry!r}")
            with torch.no_grad():
                target.local.copy_(node[tuple(slice(o, o + n) for o, n in zip(target.box.offset, target.box.size))])
            return target.dtensor
        if isinstance(node, dict):
            return {k: walk(v, (*path, k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            items = [walk(v, (*path, i)) for i, v in enumerate(node)]
            return items if isinstance(node, list) else tuple(items)
        return node

    return walk(saved, ())


def copy_own(where: str) -> Fill:
    """The fill of an exact resume: this rank's own saved shard, which must be the live box."""
    rank = _rank()

    def fill(path: Path, record: dict, target: Target) -> None:
        local = record["local"]
        if not isinstance(local, torch.Tensor):
            raise CheckpointError(f"{where}: {_shown(path)}: a sharded tensor's record holds no tensor")
        saved = parse_record(record, tuple(local.shape), rank, f"{where}: {_shown(path)}")
        if saved.box != target.box:
            raise CheckpointError(
                f"{where}: {_shown(path)}: this rank saved the box at offset {list(saved.box.offset)} of size "
                f"{list(saved.box.size)} ({saved.describe()}) but now holds offset {list(target.box.offset)} size "
                f"{list(target.box.size)}: the shard layout changed, so it needs a resharding load "
                "(elastic_hsgd.checkpoint.sharded_load.load_sharded_step)"
            )
        target.local.copy_(local)

    return fill
