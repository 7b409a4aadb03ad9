"""The one integer hash of the project: splitmix64's finaliser, fixed across runs and platforms.

Used where a draw must not depend on chunking, order or an RNG stream (hashed user tokens, GenRecEdit's
pseudo-history priorities).
"""

from __future__ import annotations

import numpy as np


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Well-spread 64-bit hash of uint64 values (wrap-around arithmetic is intended)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))
