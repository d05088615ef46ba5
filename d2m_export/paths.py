"""Where d2m-export keeps downloaded and derived files."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: $D2M_CACHE if set, else ~/.cache/d2m-export."""
    env = os.environ.get("D2M_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "d2m-export"


def assets_dir() -> Path:
    """Fetched third-party data (corpora) live here, one folder per asset."""
    return cache_dir() / "assets"
