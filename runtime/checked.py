"""The one rule for integer parameters: an int (Python's or numpy's), never a bool (True is an int in Python, and
`limit=True` must not read as 1)."""

from __future__ import annotations

import numpy as np


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
