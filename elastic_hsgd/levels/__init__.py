"""The kinds of level a :class:`~elastic_hsgd.HierarchicalModelAverager` coordinates, each owning its state and its sync.

- :mod:`.plain`: :class:`PlainLevel`, the mean of flat buffers (and the copy path), as torch averages;
- :mod:`.anchored`: :class:`AnchoredLevels`, anchors, outer optimizers and the pseudo-gradient sync,
  with :mod:`.anchors` (what a level holds, the one :class:`AnchorState`),
  :mod:`.outer_state` (their saved state) and :mod:`.agreement` (what the ranks
  agree on when the anchors are set up), and :mod:`.delayed` (an overlapped sync in flight, ``sync_delays``);
- :mod:`.wire`: :class:`WireMean`, the mean in a wire dtype (bf16, fp16, int8) with its buffers;
- :mod:`.replicas`: the :class:`TopLevel` contract and :class:`ReplicasLevel`, the top level
  across replica groups (torchft's implementation is in :mod:`elastic_hsgd.ft`).
"""

from .anchored import AnchoredLevels
from .anchors import Agreement, AnchoredLevel, AnchorState
from .plain import PlainLevel, mean_in_place
from .replicas import ReplicasLevel, TopLevel
from .wire import WireBuffers, WireMean

__all__ = [
    "Agreement",
    "AnchorState",
    "AnchoredLevel",
    "AnchoredLevels",
    "PlainLevel",
    "ReplicasLevel",
    "TopLevel",
    "WireBuffers",
    "WireMean",
    "mean_in_place",
]
