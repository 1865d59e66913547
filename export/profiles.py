"""Moved to omniguard_edge.runtime.profiles (the memory plan reads it on a runtime-only install). This name stays
for code that imports it from here: it is the same module object."""

import sys

from ..runtime import profiles

sys.modules[__name__] = profiles
