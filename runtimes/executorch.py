"""The ExecuTorch runner: runs an executorch export's `.pte` in `executorch.runtime.Runtime`.

The program keeps its KV cache inside (mutable buffers), so a step is one `forward(tokens,
input_pos)` call: prefill passes the whole prompt at position 0, decode one token at the next
position; `reset` only rewinds the position (the causal attention never reads past it).
Pitfalls:
- programs using `llama::custom_sdpa` / `llama::update_cache` need
  `executorch.extension.llm.custom_ops` imported before loading (else "Missing operator"), and
  quantized ones `executorch.kernels.quantized`; both are imported here;
- XNNPACK's thread pool is process-wide: `threads` resets it (`_unsafe_reset_threadpool`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from d2m_export.errors import UserError
from runtimes.base import Runner, quiet_native_stderr, register_runner


def _runtime():
    try:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (registers llama:: ops)
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime
    except ImportError:
        raise UserError("the executorch runner needs ExecuTorch: pip install 'd2m-export[executorch]'") from None
    try:
        import executorch.kernels.quantized  # noqa: F401  (quantized_decomposed:: kernels)
    except ImportError:
        pass
    return Runtime.get(), portable_lib


@register_runner("executorch")
class ExecuTorchRunner(Runner):
    """Options: `n_ctx` (checked against the program's max sequence length), `kv_type` (only "f32")."""

    def load(self, export_dir: Path) -> "ExecuTorchRunner":
        import torch

        runtime, portable_lib = _runtime()
        self.export_dir = Path(export_dir)
        name = next((f for f in self.manifest.get("files", []) if f.endswith(".pte")), None)
        if name is None or not (self.export_dir / name).is_file():
            raise UserError(f"{export_dir}: the manifest lists no .pte file that exists")
        kv_type = self.options.get("kv_type") or "f32"
        if kv_type != "f32":
            raise UserError(f"the executorch runner keeps the program's f32 KV cache; kv_type {kv_type!r} is not offered")
        with quiet_native_stderr():
            portable_lib._unsafe_reset_threadpool(self.threads)
            self.program = runtime.load_program(self.export_dir / name)
            methods = set(self.program.method_names)
            if "forward" not in methods:
                raise UserError(f"{name} has no forward method")
            self.max_seq_len = int(self._constant("get_max_seq_len", methods) or 0) or None
            n_ctx = self.options.get("n_ctx")
            if n_ctx and self.max_seq_len and int(n_ctx) > self.max_seq_len:
                raise UserError(f"n_ctx {n_ctx} exceeds the program's max sequence length {self.max_seq_len} "
                                f"(re-export with a larger --max-seq-len)")
            self.forward = self.program.load_method("forward")
        self.pos = 0
        self._torch = torch
        self.settings = {"threads": portable_lib._threadpool_get_thread_count(), "kv_type": "f32",
                         "max_seq_len": self.max_seq_len, "methods": sorted(methods)}
        return self

    def _constant(self, method: str, methods: set):
        if method not in methods:
            return None
        return self.program.load_method(method).execute([])[0]

    def _run(self, token_ids: list[int]) -> np.ndarray:
        torch = self._torch
        if self.max_seq_len and self.pos + len(token_ids) > self.max_seq_len:
            raise UserError(f"sequence of {self.pos + len(token_ids)} tokens exceeds the program's max sequence "
                            f"length {self.max_seq_len}")
        tokens = torch.tensor([token_ids], dtype=torch.long)
        logits = self.forward.execute([tokens, torch.tensor([self.pos], dtype=torch.long)])[0]
        self.pos += len(token_ids)
        return logits.reshape(-1, logits.shape[-1])[-1].float().numpy().copy()

    def prefill(self, token_ids: list[int]) -> np.ndarray:
        if not token_ids:
            raise UserError("prefill needs at least one token")
        self.reset()
        return self._run(list(token_ids))

    def decode(self, token_id: int) -> np.ndarray:
        return self._run([int(token_id)])

    def reset(self) -> None:
        self.pos = 0

    def rewind(self, n_tokens: int) -> None:
        self._check_rewind(n_tokens, self.pos)     # the causal mask hides cache rows at and past input_pos
        self.pos = n_tokens

    def close(self) -> None:
        self.forward = None
        self.program = None
