"""Import fxtp from the checkout this script is in, whichever fxtp the Python environment has installed.

fxtp's passes live in the top-level folder passes/ and install as fxtp.passes (setup.py's
package_dir). With `PYTHONPATH=<checkout>`, `fxtp` comes from the checkout but `fxtp.passes` from
wherever the environment's install maps it: an environment shared by several worktrees (the
transformers 5.17 one) has its editable install pointing at one of them, so a run would mix two
checkouts' code, or fail to import. use() puts the checkout first and maps fxtp.passes to its passes/.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSES = os.path.join(REPO, "passes")


class _CheckoutPasses(importlib.abc.MetaPathFinder):
    """Finds fxtp.passes in this checkout; its sub-packages follow from its __path__."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "fxtp.passes":
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(PASSES, "__init__.py"),
                                                      submodule_search_locations=[PASSES])


def use() -> None:
    """fxtp and fxtp.passes from this checkout: mapped before fxtp is imported, checked after."""
    if "fxtp.passes" in sys.modules:
        where = os.path.realpath(list(sys.modules["fxtp.passes"].__path__)[0])
        if where != os.path.realpath(PASSES):
            raise RuntimeError(f"fxtp.passes was imported from {where}, not this checkout's {PASSES}: run the "
                               "script in its own process, before anything imports fxtp")
        return
    sys.path.insert(0, REPO)
    sys.meta_path.insert(0, _CheckoutPasses())
