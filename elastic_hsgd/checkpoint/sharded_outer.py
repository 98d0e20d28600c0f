"""The averager's outer state of sharded parameters, resumed with another number of replicas.

The anchors and outer-optimizer state of DTensor parameters are flat buffers
of each rank's local shards (:mod:`elastic_hsgd.local_shards`), saved as plain
tensors in every rank file. Today's mean of replicas (:mod:`.replicas`)
averages them over every saved rank, which would mix different slices. But at
the same shard layout a saved rank and a new rank hold the same slices exactly
when every sharded tensor's box is the same, and then their buffers are laid
out alike (the same parameters in the same order, each padded to its largest
slice). So each new rank takes, buffer by buffer and element by element, the
mean over the saved ranks of its own slices: the mean-of-replicas rule, slice
by slice (saved 2 replicas x 2 shards, resumed as 1 x 2: rank ``r`` gets the
mean of saved ranks ``r`` and ``r + 2``). The result is marked
(:data:`~elastic_hsgd.averager_state.OUTER_RESLICED`), and the averager keeps it.

At another shard layout (saved 2 x 2, resumed 1 x 4 or 2 x 1) no saved rank
holds a new rank's boxes: nothing is taken here, and the averager drops its
outer state with a WARNING (:func:`~elastic_hsgd.averager_state.keeps_outer_state`);
the anchors start again from the loaded parameters.

Example::

    >>> from elastic_hsgd.sharding import Slice
    >>> table = {r: {("model", "w"): ((4, 3), (2 * (r % 2), 0), (2, 3), "F32", 0, 24)} for r in range(4)}
    >>> same_slices(table, {("model", "w"): Slice((2, 0), (2, 3))})
    [1, 3]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..averager_state import OUTER_RESLICED
from ..collectives import Peers
from ..sharding import Slice
from .commit import Unusable
from .dtensor_state import Path, live_boxes
from .rank_index import TensorSpec
from .sharded_files import SavedFiles


def outer_entries(merged: Mapping[str, Any]) -> list[str]:
    """The entries of a merged state that are a sharded averager's state with started anchors."""
    return [
        name for name, value in merged.items()
        if isinstance(value, dict) and "shard_layout" in value and isinstance(value.get("outer"), dict) and value["outer"].get("started")
    ]


def same_slices(table: Mapping[int, Mapping[Path, tuple]], mine: Mapping[Path, Slice]) -> list[int]:
    """The saved ranks whose box of every sharded tensor is this rank's (``mine``), in order.

    ``table``: per saved rank, per ``(entry, *path)``, the layout tuple of
    :data:`~.sharded_load.LayoutTable` (global shape, offset, size, ...).
    """
    return [rank for rank in sorted(table) if {path: Slice(tuple(e[1]), tuple(e[2])) for path, e in table[rank].items()} == dict(mine)]


def reslice_outer(
    state: Mapping[str, Any], merged: dict[str, Any], files: SavedFiles, table: Mapping[int, Mapping[Path, tuple]], peers: Peers, what: str
) -> bool:
    """Collective: each sharded averager entry of ``merged`` gets the mean of the saved replicas of this
    rank's slices in place of the mean over every saved rank; ``True`` if it did (the same on every rank).

    ``False`` where some rank's boxes are no saved rank's (another shard
    layout): ``merged`` is left as it is, for the averager to drop.
    """
    from .sharded_load import saved_tree

    names = [name for name in outer_entries(merged) if name in state]
    if not names:
        return False
    ranks: list[int] = []
    error = None
    try:
        saved = saved_tree(files.index(0))
        mine: dict[Path, Slice] = {}
        for name, obj in state.items():
            if isinstance(saved, dict) and name in saved:
                mine.update(live_boxes(obj, saved[name], name, what))
        ranks = same_slices(table, mine) if mine else []
    except Exception as exc:  # noqa: BLE001 - agreed below
        error = exc
    peers.agree(error, what, soft=Unusable)
    if not all(peers.gather(bool(ranks))):
        return False
    try:
        for name in names:
            merged[name]["outer"] = _mean_of(files, ranks, name, merged[name]["outer"], what)
    except Exception as exc:  # noqa: BLE001 - agreed below
        error = exc
    peers.agree(error, what, soft=Unusable)
    return True


def _mean_of(files: SavedFiles, ranks: list[int], name: str, merged: Any, what: str) -> dict[str, Any]:
    """``merged`` (the entry's outer state) with every floating tensor of one or more dimensions the mean
    over saved ``ranks``, read by range; the rest (0-d and integer state, agreed equal) as merged."""
    from .sharded_load import _read_specs, saved_tree

    totals: list[torch.Tensor] | None = None
    skeleton: Any = None
    for rank in ranks:
        tree = saved_tree(files.index(rank))
        outer = tree.get(name, {}).get("outer") if isinstance(tree, dict) and isinstance(tree.get(name), dict) else None
        if not isinstance(outer, dict):
            raise Unusable(f"{what}: saved rank {rank} has no outer state in entry {name!r}")
        specs = _specs(outer)
        values = _read_specs(files, rank, specs)
        floats = [values[(s.start, s.nbytes)].to(torch.float64) for s in specs if s.dtype.is_floating_point and len(s.shape)]
        if totals is None:
            skeleton, totals = outer, floats
        elif [t.shape for t in totals] != [f.shape for f in floats]:
            raise Unusable(f"{what}: saved ranks {ranks[0]} and {rank} hold the same slices but outer state of other shapes")
        else:
            for total, value in zip(totals, floats):
                total += value
    assert totals is not None
    means = iter([t / len(ranks) for t in totals])

    def fill(spec: Any, value: Any) -> Any:
        if isinstance(spec, TensorSpec):
            return next(means).to(spec.dtype) if spec.dtype.is_floating_point and len(spec.shape) else value
        if isinstance(spec, dict):
            return {k: fill(v, value[k]) for k, v in spec.items()}
        if isinstance(spec, (list, tuple)):
            items = [fill(s, v) for s, v in zip(spec, value)]
            return items if isinstance(value, list) else tuple(items)
        return value

    out = fill(skeleton, merged)
    out[OUTER_RESLICED] = True
    return out


def _specs(node: Any) -> list[TensorSpec]:
    """Every tensor of a decoded tree, in walk order."""
    if isinstance(node, TensorSpec):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _specs(v)]
    if isinstance(node, (list, tuple)):
        return [s for v in node for s in _specs(v)]
    return []
