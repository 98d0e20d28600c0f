"""elastic_hsgd: hierarchical SGD that survives real clusters.

- :class:`HierarchicalModelAverager`: torch's averager with a checkpointable
  step, elastic subgroups and copy-free averaging.
- :class:`CheckpointManager`: atomic, verified checkpoints to any fsspec URL.
- :mod:`elastic_hsgd.elastic`: glue for torchrun workers.
"""

from .averager import HierarchicalModelAverager
from .hierarchy import Level

__all__ = ["HierarchicalModelAverager", "Level", "CheckpointManager"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported lazily so the averager works without fsspec's optional backends loaded.
    if name == "CheckpointManager":
        from .checkpoint import CheckpointManager

        return CheckpointManager
    raise AttributeError(name)
