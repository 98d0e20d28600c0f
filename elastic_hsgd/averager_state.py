"""The averager's own saved state: step, warmup and hierarchy, as plain Python values.

Format :data:`STATE_FORMAT` (the ``"outer"`` entry, for anchored levels, is
:mod:`elastic_hsgd.levels.outer_state`'s)::

    {"format": 1, "step": int, "warmup_steps": int,
     "config": [[period, size spec], ...],     # as configured: "local", "world", "replicas" or an int
     "levels": [[period, group size], ...],    # as resolved for the world it was saved in
     "world_size": int,
     "shard_layout": str}                      # DTensor parameters only: a digest of how they are sharded
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from .hierarchy import GroupSizeSpec, Level
from .levels.anchors import AnchorState

logger = logging.getLogger(__name__)

#: Version of :meth:`HierarchicalModelAverager.state_dict`'s format.
STATE_FORMAT = 1
#: Set in a loaded ``"outer"`` entry of sharded parameters whose anchors and outer-optimizer state are already
#: the mean of the saved replicas of this rank's slices (:mod:`elastic_hsgd.checkpoint.sharded_outer`).
OUTER_RESLICED = "resliced"


def capture(
    step: int, warmup_steps: int, config: Sequence[tuple[int, GroupSizeSpec]], levels: Sequence[Level], world_size: int
) -> dict[str, Any]:
    """The state above, for the averager's ``state_dict``.

    Example::

        >>> capture(5, 2, ((2, "world"),), (Level(2, 4),), 4)["levels"]
        [[2, 4]]
    """
    return {
        "format": STATE_FORMAT,
        "step": step,
        "warmup_steps": warmup_steps,
        "config": [[period, spec] for period, spec in config],
        "levels": [[lv.period, lv.group_size] for lv in levels],
        "world_size": world_size,
    }


def check_saved(saved: Mapping[str, Any], config: Sequence[tuple[int, GroupSizeSpec]], warmup_steps: int) -> int:
    """The saved step, after checking ``saved`` has this hierarchy and warmup; raises if not.

    Example::

        >>> saved = capture(5, 2, ((2, "world"),), (Level(2, 4),), 4)
        >>> check_saved(saved, ((2, "world"),), 2)
        5
    """
    missing = {"step", "warmup_steps", "config", "world_size"} - set(saved)
    if missing:
        raise ValueError(f"averager state is missing {sorted(missing)}: was it made by state_dict()?")
    saved_config = tuple((int(p), s) for p, s in saved["config"])
    if saved_config != tuple(config):
        raise ValueError(
            f"checkpoint was saved with hierarchy {dict(saved_config)} but this averager has "
            f"{dict(config)}: build the averager with the saved hierarchy, or start a "
            "new run."
        )
    if int(saved["warmup_steps"]) != warmup_steps:
        raise ValueError(
            f"checkpoint was saved with warmup_steps={saved['warmup_steps']} but this "
            f"averager has warmup_steps={warmup_steps}: use the saved value so warmup "
            "is neither repeated nor cut short."
        )
    step = saved["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"saved step {step!r} is not a non-negative int.")
    return step


def groups_changed(saved: Mapping[str, Any], levels: Sequence[Level], world_size: int) -> bool:
    """Whether any level's groups differ from those ``saved`` was made with.

    Another world size, or the same world in another node shape: saved as 2
    nodes x 1 and resumed as 1 node x 2, ``"local"`` resolves to other groups
    (the resolved levels differ), and each rank's lower anchors are its own.

    Example::

        >>> saved = capture(5, 0, ((2, "local"), (8, "world")), (Level(2, 1), Level(8, 2)), 2)
        >>> groups_changed(saved, (Level(2, 1), Level(8, 2)), 2), groups_changed(saved, (Level(2, 2), Level(8, 2)), 2)
        (False, True)
    """
    if int(saved["world_size"]) != world_size:
        return True
    saved_levels = saved.get("levels")
    if saved_levels is None:  # made before the resolved levels were saved: the world size is all there is
        return False
    return [[int(p), int(n)] for p, n in saved_levels] != [[lv.period, lv.group_size] for lv in levels]


def refuse_other_layout(saved: str, live: str) -> None:
    """``ValueError`` unless a loaded state's shard layout digest is the parameters'.

    Raised when the parameters are known: a running averager loads a peer's
    state, as a torchft heal does, where rank ``r`` takes rank ``r``'s shards.

    >>> refuse_other_layout("ab12", "ab12")
    """
    if saved != live:
        raise ValueError(
            f"the averager state being loaded was made with the parameters sharded otherwise (shard layout {saved}) "
            f"than this job shards them (shard layout {live}): every replica group must shard the model the same "
            "way (the same shard mesh size, fully_shard calls and placements), so that rank r of every group holds "
            "the same slices."
        )


def keeps_outer_state(saved: tuple[str, int] | None, live: str, world_size: int, anchors: Any) -> None:
    """Whether a loaded outer state fits sharded parameters; if not, drop it with a WARNING.

    ``saved``: the loaded state's shard layout digest and world size (``None``:
    nothing loaded, or saved before the parameters were seen). The anchors and
    outer-optimizer state of a sharded model are each rank's own slices. They
    are kept at the same layout and world size (an exact resume), and at the
    same layout with another number of replicas when the checkpoint loader
    made them the mean of the saved replicas of this rank's slices (marked
    :data:`OUTER_RESLICED`). At another shard layout every rank drops them and
    the anchors start again from the loaded parameters. The same decision on
    every rank: its inputs are the same everywhere.

    Example::

        >>> from elastic_hsgd.levels.anchors import Agreement, AnchorState
        >>> class Anchors:
        ...     levels = ["a level"]
        ...     state = AnchorState(Agreement.STALE, pending={"started": True, OUTER_RESLICED: True})
        >>> keeps_outer_state(("ab12", 4), "ab12", 2, Anchors)   # 2 x 2 saved, 1 x 2 now: kept
        >>> Anchors.state.pending is not None
        True
    """
    if saved is None or not anchors.levels or anchors.state.pending is None:
        return
    layout, saved_world = saved
    if layout == live and (saved_world == world_size or anchors.state.pending.get(OUTER_RESLICED)):
        return
    if layout == live:
        why = "another world size, and it was not loaded slice by slice (not through a sharded checkpoint load)"
    else:
        why = "another shard layout, which the outer state is not resharded to"
    logger.warning(
        "the checkpoint's averager state was saved with %s (shard layout %s, world size %d; now %s, %d): its anchors "
        "and outer-optimizer state hold each rank's own slices, which resume only at the same layout, so they are "
        "dropped and the anchors start again from the loaded parameters at the next call at or after warmup.",
        why, layout, saved_world, live, world_size,
    )
    anchors.state = AnchorState()


def other_layout_in(live: Mapping[str, Any], payload: Mapping[str, Any]) -> str | None:
    """Before a peer's state is loaded (a torchft heal): why it does not fit, ``None`` if it does.

    ``live`` is the training state (its averager's ``state_dict()`` holds the
    ``"shard_layout"`` of the parameters it averages), ``payload`` the peer's
    captured state. Checked before anything is loaded, the model's shards first
    of all: rank ``r`` takes rank ``r``'s shards, which must be the same slices.

    >>> class Averager:
    ...     def state_dict(self):
    ...         return {"step": 3, "shard_layout": "ab12"}
    >>> other_layout_in({"averager": Averager()}, {"averager": {"shard_layout": "ab12"}}) is None
    True
    >>> other_layout_in({"averager": Averager()}, {"averager": {"shard_layout": "cd34"}}).split(":")[0]
    "entry 'averager' was saved by a replica group that shards the model otherwise (shard layout cd34, here ab12)"
    """
    for name, saved in payload.items():
        obj = live.get(name)
        if not isinstance(saved, Mapping) or "shard_layout" not in saved or not callable(getattr(obj, "state_dict", None)):
            continue
        mine = obj.state_dict().get("shard_layout")  # only the averager's state has the key
        if mine is not None and mine != saved["shard_layout"]:
            return (
                f"entry {name!r} was saved by a replica group that shards the model otherwise (shard layout "
                f"{saved['shard_layout']}, here {mine}): every replica group must shard the model the same way (the "
                "same shard mesh size, fully_shard calls and placements), so that rank r of every group holds the "
                "same slices; restart this group with the other groups' --shard-size."
            )
    return None
