"""The ONNX Runtime GenAI runner: runs an onnx export through `onnxruntime_genai` (the generate() API
that Android and iOS apps use), reading the export's `genai_config.json` as an app would.

ONNX Runtime GenAI owns the KV cache and the search; we only append tokens and read the logits of
the last position, so the parity check and the benchmark compare its numbers with ours. Threads
and the sequence length are set by overlaying the export's configuration, never by editing it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from d2m_export.errors import UserError
from runtimes.base import Runner, quiet_native_stderr, register_runner

DEFAULT_CTX = 4096


@register_runner("onnx", name="onnxruntime-genai")
class OnnxRuntimeGenAIRunner(Runner):
    """Options: `n_ctx` (the search's max_length, i.e. the KV buffer; default min(context, 4096)),
    `kv_type` (only "f32": the export's caches are f32)."""

    def load(self, export_dir: Path) -> "OnnxRuntimeGenAIRunner":
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise UserError("the onnxruntime-genai runner needs onnxruntime-genai: pip install 'd2m-export[onnx]'") from None
        self.export_dir = Path(export_dir)
        config_path = self.export_dir / "genai_config.json"
        if not config_path.is_file():
            raise UserError(f"{export_dir} has no genai_config.json; re-export it with this version of d2m-export")
        kv_type = self.options.get("kv_type") or "f32"
        if kv_type != "f32":
            raise UserError(f"the onnxruntime-genai runner keeps the export's f32 KV cache; kv_type {kv_type!r} is not offered")
        try:
            context = int(json.loads(config_path.read_text())["model"]["context_length"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{config_path} is corrupt ({e}); re-export") from None
        n_ctx = int(self.options.get("n_ctx") or min(context, DEFAULT_CTX))
        if n_ctx > context:
            raise UserError(f"n_ctx {n_ctx} exceeds the export's {context} positions")
        self.n_ctx = n_ctx
        overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": self.threads,
                                                             "inter_op_num_threads": 1}}},
                   "search": {"max_length": n_ctx}}
        with quiet_native_stderr():
            self._og = og
            config = og.Config(str(self.export_dir))
            config.overlay(json.dumps(overlay))
            self.model = og.Model(config)
        self.generator = None
        self.settings = {"n_ctx": n_ctx, "kv_type": "f32", "threads": self.threads,
                         "runtime": f"onnxruntime-genai {getattr(og, '__version__', '?')}",
                         "kv_cache": "onnxruntime-genai's, past/present shared"}
        return self

    def _new_generator(self):
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.n_ctx, do_sample=False)
        return self._og.Generator(self.model, params)

    def _append(self, token_ids: list[int]) -> np.ndarray:
        """Append tokens to the sequence; the logits of its last position (get_logits gives [1, 1, vocab])."""
        if self.pos + len(token_ids) > self.n_ctx:
            raise UserError(f"sequence of {self.pos + len(token_ids)} tokens exceeds n_ctx {self.n_ctx}")
        self.generator.append_tokens(np.asarray([token_ids], np.int32))
        self.pos += len(token_ids)
        logits = np.asarray(self.generator.get_logits(), np.float32)
        return logits.reshape(-1, logits.shape[-1])[-1].copy()

    def prefill(self, token_ids: list[int]) -> np.ndarray:
        if not token_ids:
            raise UserError("prefill needs at least one token")
        self.reset()
        self.generator = self._new_generator()
        return self._append(list(token_ids))

    def decode(self, token_id: int) -> np.ndarray:
        if self.generator is None:
            raise UserError("decode needs a prefilled sequence")
        return self._append([int(token_id)])

    def reset(self) -> None:
        self.generator = None
        self.pos = 0

    def rewind(self, n_tokens: int) -> None:
        self._check_rewind(n_tokens, self.pos if self.generator is not None else 0)
        self.generator.rewind_to(n_tokens)
        self.pos = n_tokens

    def close(self) -> None:
        self.generator = None
        self.model = None
