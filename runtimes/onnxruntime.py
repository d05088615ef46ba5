"""The ONNX Runtime runner: runs an onnx export on the CPU execution provider.

Decode is built for speed:
- one preallocated KV buffer per layer ([1, kv_heads, n_ctx, head_dim]) is bound as both
  `past_key_values.N.*` and `present.N.*`; GroupQueryAttention writes each new key/value in place,
  so nothing is concatenated or copied per step;
- IO binding everywhere: the token, its position and the attention mask are preallocated arrays
  bound by address, the logits land in a preallocated buffer; a decode step is one `run`;
- `attention_mask` is bound as a view of a preallocated row of ones, as long as the valid sequence.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from d2m_export.errors import UserError
from runtimes.base import Runner, register_runner

DEFAULT_CTX = 4096


@register_runner("onnx")
class OnnxRuntimeRunner(Runner):
    """Options: `n_ctx` (KV buffer length; default min(max positions, 4096)), `kv_type` (only "f32"),
    `optimization` ("all" | "extended" | "basic" | "none"; default "all"), `profile` (a file prefix: ONNX
    Runtime's profiler records every node's time; `end_profiling()` writes the trace and returns its path)."""

    def load(self, export_dir: Path) -> "OnnxRuntimeRunner":
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("the onnx runner needs onnxruntime: pip install 'd2m-export[onnx]'") from None
        self.export_dir = Path(export_dir)
        graph = next((f for f in self.manifest.get("files", []) if f.endswith(".onnx")), None)
        if graph is None or not (self.export_dir / graph).is_file():
            raise UserError(f"{export_dir}: the manifest lists no .onnx file that exists")
        kv_type = self.options.get("kv_type") or "f32"
        if kv_type != "f32":
            raise UserError(f"the onnx runner keeps an f32 KV cache; kv_type {kv_type!r} is not offered")
        level = self.options.get("optimization") or "all"
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        if level not in levels:
            raise UserError(f"optimization must be one of {', '.join(levels)}, not {level!r}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = levels[level]
        so.log_severity_level = 3
        if self.options.get("profile"):
            so.enable_profiling = True
            so.profile_file_prefix = str(self.options["profile"])
        self.session = ort.InferenceSession(str(self.export_dir / graph), so, providers=["CPUExecutionProvider"])

        inputs = {i.name: i for i in self.session.get_inputs()}
        past = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_layer_kv_order)
        if not past or any(n not in inputs for n in ("input_ids", "attention_mask", "position_ids")):
            raise UserError(f"{graph} does not have the decoder interface (input_ids, attention_mask, position_ids, "
                            f"past_key_values.N.key/value)")
        _, kv_heads, _, head_dim = inputs[past[0]].shape
        max_positions = int((self.manifest.get("onnx") or {}).get("max_positions") or DEFAULT_CTX)
        n_ctx = int(self.options.get("n_ctx") or min(max_positions, DEFAULT_CTX))
        if n_ctx > max_positions:
            raise UserError(f"n_ctx {n_ctx} exceeds the export's {max_positions} positions")
        self.n_ctx = n_ctx
        self.vocab = int(self.session.get_outputs()[0].shape[-1])

        # preallocated state: KV buffers, the decode token/position, a row of ones for the mask, logits
        self._kv = [np.zeros((1, kv_heads, n_ctx, head_dim), np.float32) for _ in past]
        self._token = np.zeros((1, 1), np.int64)
        self._position = np.zeros((1, 1), np.int64)
        self._ones = np.ones((1, n_ctx), np.int64)
        self._logits = np.zeros((1, 1, self.vocab), np.float32)
        self.io = self.session.io_binding()
        for name, buf in zip(past, self._kv):
            present = name.replace("past_key_values.", "present.")
            self._bind(name, buf, is_input=True)
            self._bind(present, buf, is_input=False)
        self.pos = 0
        self.settings = {"n_ctx": n_ctx, "kv_type": "f32", "threads": self.threads, "optimization": level,
                         "kv_cache": "preallocated, shared past/present (in place)", "io_binding": True,
                         "providers": self.session.get_providers()}
        return self

    def _bind(self, name: str, array: np.ndarray, is_input: bool, shape=None) -> None:
        args = dict(device_type="cpu", device_id=0, element_type=array.dtype.type,
                    shape=list(shape or array.shape), buffer_ptr=array.ctypes.data)
        if is_input:
            self.io.bind_input(name, **args)
        else:
            self.io.bind_output(name, **args)

    def _run(self, ids: np.ndarray, positions: np.ndarray, logits: np.ndarray) -> None:
        n = ids.shape[1]
        if self.pos + n > self.n_ctx:
            raise UserError(f"sequence of {self.pos + n} tokens exceeds n_ctx {self.n_ctx}")
        self._bind("input_ids", ids, True)
        self._bind("position_ids", positions, True)
        self._bind("attention_mask", self._ones, True, shape=(1, self.pos + n))
        self._bind("logits", logits, False)
        self.session.run_with_iobinding(self.io)
        self.pos += n

    def prefill(self, token_ids: list[int]) -> np.ndarray:
        if not token_ids:
            raise UserError("prefill needs at least one token")
        self.reset()
        ids = np.asarray([token_ids], np.int64)
        logits = np.empty((1, ids.shape[1], self.vocab), np.float32)
        self._run(ids, np.arange(ids.shape[1], dtype=np.int64)[None], logits)
        return logits[0, -1].copy()

    def decode(self, token_id: int) -> np.ndarray:
        if self.pos == 0:
            raise UserError("decode needs a prefilled sequence")
        self._token[0, 0] = token_id
        self._position[0, 0] = self.pos
        self._run(self._token, self._position, self._logits)
        return self._logits[0, 0].copy()

    def reset(self) -> None:
        self.pos = 0     # GroupQueryAttention reads only the first `pos` cache rows: no need to clear them

    def rewind(self, n_tokens: int) -> None:
        self._check_rewind(n_tokens, self.pos)
        self.pos = n_tokens

    def end_profiling(self) -> Path:
        return Path(self.session.end_profiling())

    def close(self) -> None:
        self.io = None
        self.session = None


def _layer_kv_order(name: str) -> tuple[int, int]:
    _, layer, kind = name.split(".")
    return int(layer), 0 if kind == "key" else 1
