"""Moved to omniguard_edge.runtime.recipes (the memory plan reads it on a runtime-only install). This name stays
for code that imports it from here: it is the same module object."""

import sys

from ..runtime import recipes

sys.modules[__name__] = recipes
