"""The role a plan gives a group of projections (or a token embedding table).

The automatic planner (passes/sharding/plan.py) decides roles; a manual plan names them in its
user-facing styles ("colwise", "rowwise", "replicate": passes/sharding/manual_plan.py maps them
here). Values are the words the dump, `fxtp demo` and FXTP_DEBUG print.
"""
from __future__ import annotations

from enum import Enum

__all__ = ["Role"]


class Role(str, Enum):
    COLUMN_PARALLEL = "column-parallel"               # weights sharded on output features: sharded outputs
    COLUMN_GATHERED = "column-parallel (gathered)"    # its shard reaches the graph output, all-gathered there
    ROW_PARALLEL = "row-parallel"                     # reads a sharded input, weights sliced alike: a Partial
    REPLICATED = "replicated"                         # every rank holds and computes it whole
    VOCAB_PARALLEL = "vocab-parallel"                 # a token embedding table sharded over vocab rows

    @property
    def seeds_shard(self) -> bool:
        """Whether the plan seeds the group's weights with a Shard (row-parallel weights follow from the rules)."""
        return self in (Role.COLUMN_PARALLEL, Role.COLUMN_GATHERED, Role.VOCAB_PARALLEL)

    # printed as the value, like the plain strings these were: a str-mixin Enum's str() names the member
    # (Role.ROW_PARALLEL), and so does its format() from Python 3.12
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)
