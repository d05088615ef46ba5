"""The coreml target's conversion with coremltools: the lowered module traced to TorchScript, converted to
an fp16 ML Program, and (int8 / int4) its weight matrices linearly quantized (converters/coreml.py)."""
from __future__ import annotations

import contextlib
import functools
import logging
import warnings

import numpy as np

from d2m_export.errors import UserError

BLOCK = 32                    # int4: one scale per 32 inputs of a row


def import_coremltools():
    """coremltools, imported quietly unless -v: on Linux it logs that its prediction library is
    missing (expected here), and that it has not been tested with this torch release."""
    if not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger("coremltools").setLevel(logging.ERROR)
    try:
        import coremltools
    except ImportError:
        raise UserError("the coreml target needs coremltools: pip install 'd2m-export[coreml]'") from None
    return coremltools


@contextlib.contextmanager
def quiet_progress():
    """coremltools draws progress bars for every conversion stage; hide them unless -v."""
    import importlib

    if logging.getLogger().isEnabledFor(logging.INFO):
        yield
        return
    patched = []
    for module, attr in (("coremltools.converters.mil.frontend.torch.ops", "_tqdm"),
                         ("coremltools.converters.mil.mil.passes.pass_pipeline", "tqdm"),
                         ("coremltools.optimize.coreml._quantization_passes", "tqdm")):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, attr):
            patched.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, functools.partial(getattr(mod, attr), disable=True))
    try:
        yield
    finally:
        for mod, attr, original in patched:
            setattr(mod, attr, original)


def graph_digest(traced) -> str:
    """The traced graph's identity: its ops, shapes and order, not its weights (TorchScript numbers
    the class names of every module it compiles, `___torch_mangle_<n>`; those are left out)."""
    import hashlib
    import re

    text = re.sub(r"___torch_mangle_\d+\.", "", str(traced.inlined_graph))
    return hashlib.sha256(text.encode()).hexdigest()


def trace(lowered):
    """TorchScript of the lowered module, traced at a prefill of 3 tokens after 2 (sizes stay symbolic)."""
    import torch

    from converters.coreml_module import causal_mask

    lowered.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(lowered, (torch.zeros(1, 3, dtype=torch.int32), causal_mask(2, 3)),
                                 check_trace=False)
    lowered.reset()
    return traced


def convert(traced, lowered):
    """The fp16 ML Program (not loaded: Core ML may not exist here)."""
    from converters.coreml_module import OUTPUT, STATES

    ct = import_coremltools()
    n = lowered.max_seq_len
    q = ct.RangeDim(1, n, default=1, symbol="query_length")
    end = ct.RangeDim(1, n, default=1, symbol="end")
    cache = tuple(lowered.key_cache.shape)
    with quiet_progress(), warnings.catch_warnings(), lean_fp16_overflow_check():
        warnings.simplefilter("ignore")
        return ct.convert(
            traced,
            inputs=[ct.TensorType(name="input_ids", shape=(1, q), dtype=np.int32),
                    ct.TensorType(name="causal_mask", shape=(1, 1, q, end), dtype=np.float32)],
            outputs=[ct.TensorType(name=OUTPUT, dtype=np.float32)],
            states=[ct.StateType(wrapped_type=ct.TensorType(shape=cache, dtype=np.float16), name=s) for s in STATES],
            minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
            convert_to="mlprogram", skip_model_load=True)


def finite_abs_max(value, chunk: int = 1 << 22) -> float:
    """max |x| over the elements with |x| < 1e38 (0 if none), a chunk at a time."""
    flat = np.asarray(value).reshape(-1)
    peak = 0.0
    for i in range(0, flat.size, chunk):
        a = np.abs(flat[i:i + chunk])
        a = a[a < 1e38]
        if a.size:
            peak = max(peak, float(a.max()))
    return peak


@contextlib.contextmanager
def lean_fp16_overflow_check():
    """coremltools' fp16 pass asks, for every fp32 constant, whether a finite value exceeds fp16's
    range, by building |x| and the int64 indices of every element below 1e38: about six times the
    constant's own size at once (7 GB for a 152k-vocabulary embedding at 2048 wide). The same
    question, asked a chunk at a time."""
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    def fp16_overflow(op) -> bool:
        for inputs in op.inputs.values():
            for var in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
                if (var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32")
                        and finite_abs_max(var.op.val.val) > 65504):
                    return True
        return False

    original = FP16ComputePrecision.__dict__["fp16_overflow"]
    FP16ComputePrecision.fp16_overflow = staticmethod(fp16_overflow)
    try:
        yield
    finally:
        FP16ComputePrecision.fp16_overflow = original


def block_size(shape: tuple[int, ...], quant: str) -> tuple[tuple[int, ...], str | None]:
    """Per-block quantization blocks along each weight's input (last) axis, and why it differs from
    the default, if it does. int8: one block per row. int4: 32 inputs, or the largest of 16/8 that
    divides the row, or the whole row."""
    rows = (1,) * (len(shape) - 1)
    if quant == "int8":
        return rows + (0,), None
    for b in (BLOCK, 16, 8):
        if shape[-1] % b == 0:
            return rows + (b,), None if b == BLOCK else f"row of {shape[-1]} is not a multiple of {BLOCK}: blocks of {b}"
    return rows + (0,), f"row of {shape[-1]} has no block size of 8-32: one scale per row"


def compress(mlmodel, quant: str, keys: list[str], release: bool = False):
    """int8 / int4 linear (symmetric) quantization of the named weight matrices, experts included.
    `release`: drop `mlmodel`'s program from memory first (coremltools reads it back from its weight
    files to compress it, so it would be held twice); `mlmodel` cannot be used after."""
    import gc

    import coremltools.optimize as cto

    from converters.coreml_program import weight_key

    wanted, configs, fallbacks = set(keys), {}, []
    for op in mlmodel._mil_program.functions["main"].operations:
        if op.op_type == "const" and weight_key(op.name) in wanted:
            shape = tuple(op.outputs[0].shape)
            block, why = block_size(shape, quant)
            if why:
                fallbacks.append({"weight": weight_key(op.name), "shape": list(shape), "why": why})
            configs[op.name] = cto.coreml.OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype=quant, granularity="per_block", block_size=list(block),
                weight_threshold=1)
    if release:
        mlmodel._mil_program = None
        gc.collect()
    with quiet_progress(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed = cto.coreml.linear_quantize_weights(
            mlmodel, cto.coreml.OptimizationConfig(global_config=None, op_name_configs=configs))
    return compressed, fallbacks
