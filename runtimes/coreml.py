"""The Core ML runner (through coremltools): runs a coreml export where Core ML exists (macOS).

Each call feeds `input_ids` [1, q] and `causal_mask` [1, 1, q, end] with the conversation's
`MLState` (the KV cache, updated in place by the model); `end` is the number of cache positions
filled after the call. A prompt is fed in chunks of `prefill_chunk` tokens (default 32): MoE
layers gather the selected experts' weights per token, so one huge chunk costs memory.

On Linux (or any platform without Core ML) `load` raises `UserError`: Core ML prediction needs
macOS, so `d2m-export bench DIR` and `generate DIR` exit 2 there. The export itself was verified
at conversion time; see `verification` in its manifest.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from d2m_export.errors import UserError
from runtimes.base import Runner, register_runner

COMPUTE_UNITS = {"all": "ALL", "cpu": "CPU_ONLY", "cpu_gpu": "CPU_AND_GPU", "cpu_ne": "CPU_AND_NE"}


def causal_mask(past: int, q_len: int) -> np.ndarray:
    """[1, 1, q, past + q] fp32: 0 where query i (at position past + i) may attend, -inf elsewhere."""
    end = past + q_len
    allowed = np.arange(end)[None, :] <= (past + np.arange(q_len))[:, None]
    return np.where(allowed, 0.0, -np.inf).astype(np.float32).reshape(1, 1, q_len, end)


@register_runner("coreml")
class CoreMLRunner(Runner):
    """Options: `compute_units` ("all" | "cpu" | "cpu_gpu" | "cpu_ne"; default "all"),
    `prefill_chunk` (tokens per prefill call; default 32), `n_ctx` (must fit the export's max_seq_len)."""

    @classmethod
    def check_host(cls, export_dir: Path) -> None:
        if sys.platform != "darwin":
            raise UserError(f"Core ML prediction needs macOS (this is {sys.platform}): copy {export_dir} to a Mac, or "
                            "load its .mlpackage in an iOS/macOS app (docs/runtimes/coreml.md: In an app); the export "
                            "was verified at conversion time (manifest.json: verification)")

    def load(self, export_dir: Path) -> "CoreMLRunner":
        self.check_host(export_dir)
        try:
            import coremltools as ct
        except ImportError:
            raise UserError("the coreml runner needs coremltools: pip install 'd2m-export[coreml]'") from None
        self.export_dir = Path(export_dir)
        package = next((f for f in self.manifest.get("files", []) if f.endswith(".mlpackage")), None)
        if package is None or not (self.export_dir / package).is_dir():
            raise UserError(f"{export_dir}: the manifest lists no .mlpackage that exists")
        self.max_seq_len = int((self.manifest.get("coreml") or {}).get("max_seq_len") or 0)
        if not self.max_seq_len:
            raise UserError(f"{export_dir}/manifest.json has no coreml.max_seq_len")
        n_ctx = self.options.get("n_ctx")
        if n_ctx and int(n_ctx) > self.max_seq_len:
            raise UserError(f"a context of {n_ctx} tokens does not fit this export (--max-seq-len {self.max_seq_len}); "
                            "export again with a larger --max-seq-len")
        units = self.options.get("compute_units") or "all"
        if units not in COMPUTE_UNITS:
            raise UserError(f"compute_units must be one of {', '.join(COMPUTE_UNITS)}, not {units!r}")
        self.chunk = max(1, int(self.options.get("prefill_chunk") or 32))
        self.model = ct.models.MLModel(str(self.export_dir / package),
                                       compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[units]))
        self.settings = {"compute_units": units, "prefill_chunk": self.chunk, "max_seq_len": self.max_seq_len,
                         "threads": "chosen by Core ML"}
        self.reset()
        return self

    def _run(self, ids: list[int]) -> np.ndarray:
        if self.length + len(ids) > self.max_seq_len:
            raise UserError(f"sequence of {self.length + len(ids)} tokens exceeds this export's --max-seq-len "
                            f"{self.max_seq_len}")
        out = self.model.predict({"input_ids": np.array([ids], dtype=np.int32),
                                  "causal_mask": causal_mask(self.length, len(ids))}, state=self.state)
        self.length += len(ids)
        return np.asarray(out["logits"], dtype=np.float32).reshape(-1)

    def prefill(self, token_ids: list[int]) -> np.ndarray:
        if not token_ids:
            raise UserError("prefill needs at least one token")
        self.reset()
        ids = [int(t) for t in token_ids]
        for start in range(0, len(ids), self.chunk):
            logits = self._run(ids[start:start + self.chunk])
        return logits

    def decode(self, token_id: int) -> np.ndarray:
        return self._run([int(token_id)])

    def reset(self) -> None:
        self.state = self.model.make_state()      # a fresh KV cache
        self.length = 0

    def close(self) -> None:
        self.model = self.state = None
