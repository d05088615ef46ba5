"""The llama.cpp runner (through llama-cpp-python): runs a GGUF export in stock llama.cpp.

Pitfalls, each met in practice:
- with `logits_all=False` the wrapper's `scores` stay zero after `eval()`; the logits of the
  last evaluated token are read from the context (`_ctx.get_logits()`);
- the default f16 KV cache costs ~2e-3 logit error (a near-tie argmax can flip), so the parity
  check asks for an f32 cache (`kv_type="f32"`); the benchmark keeps the runtime default;
- llama.cpp picks its own thread count unless told: `threads` is always passed;
- on CPUs with AMX, llama.cpp's AMX kernels (an "extra buffer type" for q4_0/q8_0 weights)
  crashed with SIGSEGV in `ggml_backend_amx_mul_mat` here (llama-cpp-python 0.3.36 built with
  its default native flags, in a VM), even on llama.cpp's own GGUF files. Where the CPU reports
  AMX, extra buffer types are turned off (`extra_buffers=False`), which also turns off weight
  repacking; f32/f16 weights never use them.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from d2m_export.errors import UserError
from runtimes.base import Runner, quiet_native_stderr, register_runner

# ggml type ids of the KV cache element types we offer
KV_TYPES = {"f32": 0, "f16": 1}


def cpu_has_amx() -> bool:
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@contextlib.contextmanager
def _model_params(**overrides):
    """llama-cpp-python sets model parameters it does not expose from `llama_model_default_params()`:
    wrap that call while one `Llama` is built."""
    import llama_cpp.llama as module

    default = module.llama_cpp.llama_model_default_params

    def patched():
        params = default()
        for key, value in overrides.items():
            setattr(params, key, value)
        return params

    module.llama_cpp.llama_model_default_params = patched
    try:
        yield
    finally:
        module.llama_cpp.llama_model_default_params = default


@register_runner("gguf")
class LlamaCppRunner(Runner):
    """Options: `n_ctx` (default: min(manifest context_length, 4096)), `kv_type` ("f16" | "f32"),
    `extra_buffers` (default: off where the CPU has AMX, see above)."""

    def load(self, export_dir: Path) -> "LlamaCppRunner":
        try:
            from llama_cpp import Llama
        except ImportError:
            raise UserError("the gguf runner needs llama-cpp-python: pip install 'd2m-export[gguf]'") from None
        self.export_dir = Path(export_dir)
        files = [f for f in self.manifest.get("files", []) if f.endswith(".gguf")]
        if not files:
            raise UserError(f"{export_dir}: the manifest lists no .gguf file")
        kv_type = self.options.get("kv_type", "f16")
        if kv_type not in KV_TYPES:
            raise UserError(f"kv_type must be one of {', '.join(KV_TYPES)}, not {kv_type!r}")
        n_ctx = int(self.options.get("n_ctx") or min(int(self.manifest.get("context_length") or 4096), 4096))
        extra = self.options.get("extra_buffers")
        extra = not cpu_has_amx() if extra is None else bool(extra)
        with _model_params(use_extra_bufts=extra), quiet_native_stderr():    # e.g. step35's SWA-cache notice
            self.llm = Llama(model_path=str(self.export_dir / files[0]), n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                             n_threads=self.threads, n_threads_batch=self.threads, logits_all=False,
                             type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type], verbose=False)
        self.settings = {"n_ctx": n_ctx, "kv_type": kv_type, "extra_buffers": extra, "threads": self.threads}
        self.n_ctx = n_ctx
        self.n_vocab = self.llm.n_vocab()
        return self

    def _logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,)).astype(np.float32)

    def _eval(self, token_ids: list[int]) -> np.ndarray:
        if self.llm.n_tokens + len(token_ids) > self.n_ctx:
            raise UserError(f"sequence of {self.llm.n_tokens + len(token_ids)} tokens exceeds n_ctx {self.n_ctx}")
        self.llm.eval(token_ids)
        return self._logits()

    def prefill(self, token_ids: list[int]) -> np.ndarray:
        if not token_ids:
            raise UserError("prefill needs at least one token")
        self.reset()
        return self._eval(list(token_ids))

    def decode(self, token_id: int) -> np.ndarray:
        return self._eval([int(token_id)])

    def reset(self) -> None:
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()

    def rewind(self, n_tokens: int) -> None:
        self._check_rewind(n_tokens, self.llm.n_tokens)
        self.llm._ctx.kv_cache_seq_rm(-1, n_tokens, -1)
        self.llm.n_tokens = n_tokens

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None
