"""Exactly-zero neurons of a dense SwiGLU MLP, which exporters can leave out (moe2dense pads
layers that were already dense with them, to give the checkpoint one MLP width)."""
from __future__ import annotations

import numpy as np


def live_neurons(gate: np.ndarray, up: np.ndarray, down: np.ndarray, multiple: int = 32) -> np.ndarray:
    """Indices of the hidden neurons of a bias-free SwiGLU MLP worth keeping: one with a zero gate
    row, up row or down column adds exactly 0 (silu(0) = 0). Dead ones are kept back up to a
    multiple of `multiple` neurons (the int4/int8 block size) when the width allows."""
    alive = np.any(gate != 0, axis=1) & np.any(up != 0, axis=1) & np.any(down != 0, axis=0)
    short = -int(alive.sum()) % multiple or (multiple if not alive.any() else 0)
    alive[np.flatnonzero(~alive)[:short]] = True
    return np.flatnonzero(alive)
