"""Fusion plans: which layers host, which donate; chosen from a file, a ratio or a threshold.

A plan is plain data (it round-trips through `d2m_plan.json`); methods turn it into models.

Stage 2, plan: the plan types (here), the calibration activations (`calibration`), the redundancy analysis
(`analysis`), and the planners that choose a plan from it (`planner`: by ratio, latency or threshold;
`loss_search`: by measured loss).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from d2m_export.errors import UserError


@dataclass
class Block:
    host: int
    donors: list[int]


@dataclass
class Options:
    # host MLP as one of the routed experts (default: a router that always picks it is exactly the
    # pruned model, so healing starts from pruning's quality), or as an always-on shared expert
    host_mode: str = "routed"
    top_k: int = 1
    num_experts: int | None = None   # None: as many as the largest block has distinct experts
    router_init: str = "calibrated"  # calibrated (fitted on calibration data) | zero
    alpha: float = 1.0               # weight of the host's (shared) MLP
    beta: float = 1.0                # weight of each selected routed expert under a uniform router

    def validate(self) -> None:
        if self.host_mode not in ("shared", "routed"):
            raise UserError(f"--host-mode must be shared or routed, not {self.host_mode!r}")
        if self.router_init not in ("zero", "calibrated"):
            raise UserError(f"--router-init must be zero or calibrated, not {self.router_init!r}")
        if not _is_int(self.top_k) or self.top_k < 1:
            raise UserError(f"--top-k must be an integer of at least 1, not {self.top_k!r}")
        if self.num_experts is not None and (not _is_int(self.num_experts) or self.num_experts < self.top_k):
            raise UserError(f"--num-experts {self.num_experts!r} must be an integer, at least --top-k {self.top_k}")
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
                raise UserError(f"--{name} must be a finite number, not {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Plan:
    method: str
    num_layers: int
    blocks: list[Block] = field(default_factory=list)
    options: Options = field(default_factory=Options)

    def validate(self, allow_empty_donors: bool = False) -> None:
        seen: dict[int, int] = {}
        for b in self.blocks:
            layers = [b.host, *b.donors]
            for layer in layers:
                if not (isinstance(layer, int) and 0 <= layer < self.num_layers):
                    raise UserError(f"plan names layer {layer}, but the model has layers 0..{self.num_layers - 1}")
                if layer in seen:
                    raise UserError(f"plan blocks overlap: layer {layer} is in the block of host {seen[layer]} "
                                    f"and of host {b.host}")
                seen[layer] = b.host
            if not b.donors and not allow_empty_donors:
                raise UserError(f"plan block with host {b.host} has no donors")
            if b.donors and b.donors != list(range(b.host + 1, b.host + 1 + len(b.donors))):
                raise UserError(f"plan block with host {b.host}: donors {b.donors} must be the layers right after "
                                f"the host, in order ({b.host + 1}, {b.host + 2}, ...)")
        self.options.validate()

    @property
    def donors(self) -> list[int]:
        return sorted(d for b in self.blocks for d in b.donors)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, method: str | None = None, num_layers: int | None = None) -> "Plan":
        example = "expected blocks: [{host: 3, donors: [4, 5]}, ...]"
        if not isinstance(d.get("blocks"), list):
            raise UserError(f"plan has no 'blocks' list; {example}")
        if unknown := set(d) - {"method", "num_layers", "blocks", "options"}:
            raise UserError(f"plan has unknown key(s) {', '.join(sorted(map(str, unknown)))}; {example}")
        blocks = []
        for b in d["blocks"]:
            if isinstance(b, dict) and set(b) <= {"host", "donors"} and "host" in b and isinstance(b.get("donors", []), list):
                host, donors = b["host"], list(b.get("donors", []))
            elif isinstance(b, list) and b:
                host, donors = b[0], b[1:]
            else:
                raise UserError(f"plan block {b!r} is malformed; {example}")
            if not all(map(_is_int, [host, *donors])):
                raise UserError(f"plan block {b!r}: layers are integers")
            blocks.append(Block(host=host, donors=donors))
        options = d.get("options", {})
        if not isinstance(options, dict) or not set(options) <= set(Options.__dataclass_fields__):
            raise UserError(f"plan options {options!r} are malformed; known options: "
                            f"{', '.join(Options.__dataclass_fields__)}")
        num_layers = num_layers or d.get("num_layers")
        if not _is_int(num_layers):
            raise UserError(f"plan has no valid num_layers ({num_layers!r})")
        return cls(method=method or d.get("method", "lfuc"), num_layers=num_layers, blocks=blocks,
                   options=Options(**options))


def read_plan_file(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--plan {path} not found")
    try:
        text = path.read_bytes().decode("utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml and json raise unrelated types
        raise UserError(f"--plan {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"--plan {path}: expected a mapping with a 'blocks' list")
    data = data.get("plan", data)   # accept a d2m_plan.json as a plan file too
    if not isinstance(data, dict):
        raise UserError(f"--plan {path}: 'plan' is not a mapping with a 'blocks' list")
    return data
