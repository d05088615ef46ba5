"""Device profiles: one YAML per device under device_profiles/, validated on load."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from d2m_export.errors import UserError

PROFILE_DIR = Path(__file__).resolve().parents[2] / "device_profiles"
REQUIRED = ("name", "memory_bandwidth_gbs", "compute_gflops", "usable_ram_gb", "sources")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class DeviceProfile:
    key: str
    name: str
    memory_bandwidth_gbs: float
    compute_gflops: dict[str, float]
    usable_ram_gb: float
    sources: dict[str, str]
    runtime_efficiency: dict[str, float] = field(default_factory=dict)   # measured: achieved ÷ roofline
    runtime_kv_efficiency: dict[str, float] = field(default_factory=dict)   # the same, of the KV-cache reads


def available() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(spec: str | Path) -> DeviceProfile:
    import yaml

    path = Path(spec)
    if not path.suffix:
        path = PROFILE_DIR / f"{spec}.yaml"
    if not path.is_file():
        raise UserError(f"device profile {spec!r} not found; available: {', '.join(available())} (or a YAML path)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with {', '.join(REQUIRED)}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise UserError(f"{path}: missing field {missing[0]!r} (a profile needs {', '.join(REQUIRED)})")
    compute = data["compute_gflops"]
    if not isinstance(compute, dict) or any(p not in compute for p in PRECISIONS):
        raise UserError(f"{path}: compute_gflops needs {', '.join(PRECISIONS)}")
    numbers = {"memory_bandwidth_gbs": data["memory_bandwidth_gbs"], "usable_ram_gb": data["usable_ram_gb"],
               **{f"compute_gflops.{k}": v for k, v in compute.items()},
               **{f"{field}.{k}": v for field in ("runtime_efficiency", "runtime_kv_efficiency")
                  for k, v in (data.get(field) or {}).items()}}
    for key, value in numbers.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{path}: {key} must be a positive number, not {value!r}")
    return DeviceProfile(key=path.stem, name=str(data["name"]), memory_bandwidth_gbs=float(data["memory_bandwidth_gbs"]),
                         compute_gflops={k: float(v) for k, v in compute.items()},
                         usable_ram_gb=float(data["usable_ram_gb"]), sources=dict(data["sources"]),
                         runtime_efficiency={k: float(v) for k, v in (data.get("runtime_efficiency") or {}).items()},
                         runtime_kv_efficiency={k: float(v) for k, v in (data.get("runtime_kv_efficiency") or {}).items()})
