"""What the fusion passes ask of a node while they match a chain of ops."""
from __future__ import annotations

from typing import Optional

import torch.fx as fx


def only_user(node: fx.Node) -> Optional[fx.Node]:
    """The one node that reads `node`, or None if none or several do."""
    return next(iter(node.users)) if len(node.users) == 1 else None
