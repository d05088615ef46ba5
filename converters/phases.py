"""Per-phase timings of the export running now, recorded in its manifest's `timings_s`."""
from __future__ import annotations

import time
from contextlib import contextmanager

_TIMINGS: dict | None = None     # the phases of the export running now, in seconds


@contextmanager
def phase(name: str):
    """Time a phase of the running export into its manifest's `timings_s` (a phase met twice adds up);
    outside an export it only runs the block. Exporters may time their own parts (load, convert,
    quantize, write) with it."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if _TIMINGS is not None:
            _TIMINGS[name] = _TIMINGS.get(name, 0.0) + time.perf_counter() - t0


@contextmanager
def timing(timings: dict):
    global _TIMINGS
    outer, _TIMINGS = _TIMINGS, timings
    try:
        yield timings
    finally:
        _TIMINGS = outer
