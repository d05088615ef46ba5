"""Core ML for iOS and macOS apps: one `.mlpackage` (ML Program, iOS 18 / macOS 15) per export.

What the package is (see `converters/coreml_module.py` for the lowering, exact in fp32):
- inputs `input_ids` [1, q] int32 and `causal_mask` [1, 1, q, end] fp32 (0 = attend, -inf = not),
  1 ≤ q ≤ end ≤ max_seq_len; output `logits` [1, vocab] fp32 for the last position;
- states `key_cache` / `value_cache`, fp16 [layers, 1, kv_heads, max_seq_len, head_dim], written in
  place (`ct.StateType`): an app makes one state per conversation and passes it to every call;
- fp16 compute; MoE layers as a gather of the top-k experts' stacked weights (Core ML has no MoE
  op; a decode step reads only the selected experts);
- `int8` / `int4`: every weight matrix (embedding / LM head, attention, MLPs, every expert) is
  linearly quantized with `coremltools.optimize.coreml` (symmetric; int8 one scale per output row,
  int4 one per block of 32 inputs) and stored as `constexpr_blockwise_shift_scale`; routers, norms
  and the RoPE tables stay fp16.

Core ML predicts only on macOS/iOS, so on Linux an export is verified without it
(manifest `verification`, `parity.checked_on: "pytorch-lowered-module"`):
1. the saved program is read back: interface, states, one in-place state write per attention
   layer and cache, every MoE layer with all its experts behind a gather, and (int8/int4) every
   weight matrix stored compressed (`converters/coreml_program.py`);
2. the traced lowered module — the TorchScript graph handed to coremltools — runs in fp32 against
   transformers: every greedy token must match (teacher-forced and free-running);
3. the weights as the package stores them (decompressed) are loaded into the lowered module and
   run in fp32 (the quantization's effect, gated like other targets' lossy quants);
4. the same in fp16 on PyTorch's CPU kernels: a proxy for fp16 compute, recorded, not gated.
Not checked here: Core ML's own kernels and their fp16 numerics, speed, memory, compute units.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converters.base import Exporter, lossy, register_target
from converters.coreml_convert import (compress, convert, finite_abs_max, graph_digest,  # noqa: F401 (tests)
                                       import_coremltools, lean_fp16_overflow_check, trace)
from d2m_export.errors import ParityError, UserError

log = logging.getLogger(__name__)
PACKAGE = "model.mlpackage"
DEFAULT_MAX_SEQ_LEN = 4096 + 64   # a 4096-token context and 64 decoded tokens (at most the model's)
MIN_MAX_SEQ_LEN = 64          # the parity check's prompts plus its greedy tokens fit
FP32_TOLERANCE = (1e-2, 1.0)  # the fp32 lowered module must reproduce every greedy token


@dataclass
class Run:
    """What one export hands from `export` to `parity` and `verification` (keyed by its directory)."""
    model: object
    tokenizer: object
    lowered: object
    traced: object
    max_seq_len: int
    report: dict
    expected: dict
    wall_s: dict
    fallbacks: list = field(default_factory=list)
    checks: dict = field(default_factory=dict)


@register_target("coreml")
class CoreMLExporter(Exporter):
    description = "Core ML (.mlpackage, iOS 18 / macOS 15): stateful KV cache, MoE by gather, fp16 compute"
    quants = ("fp16", "int8", "int4")
    default_quant = "fp16"
    options = ("max_seq_len",)
    # the package's stored (decompressed) weights in the fp32 lowered module, against transformers, gated on
    # the fixed text (converters.parity): mean KL about twice (at least 0.005 nats) the worst of SmolLM2-135M
    # dense, LF-UC 0.8 unhealed and healed, top-1 agreement where the reference is decisive below the worst
    # agreement over all positions (bench/results/parity_gates_smollm2.md). Worst: fp16 1.00 / 0.0005 nats,
    # int8 0.930 / 0.021, int4 0.553 / 0.761.
    artifact_bytes_per_param = {"fp16": 2.0, "int8": 1.0, "int4": 0.5}
    # Beyond the model: the MIL program's fp16 copy of the weights (coremltools builds the program from
    # the fp32 module, whose weights it shares, then casts) and what the passes and serialisation
    # hold on the way: 21.52 GB at fp16 on a 3.09B model. int8/int4 compress that program once the
    # module and the program in memory are gone, which peaks lower (1B: 9.92 GB int4, 10.55 fp16;
    # with them held, the 3B int4 export was killed at 23.04 GB). bench/results/scale.md
    toolchain_fp32_copies = {"fp16": 1.2, "int8": 1.2, "int4": 1.2}
    tolerances = {"fp16": lossy(0.9, 0.005), "int8": lossy(0.85, 0.05), "int4": lossy(0.45, 1.5)}

    def __init__(self):
        self._runs: dict[str, Run] = {}

    def check_options(self, config: dict, options: dict) -> dict:
        from converters.coreml_module import check_supported
        from d2m_export.architectures import check_table_rope, table_positions

        check_supported(config)
        n = options.get("max_seq_len")
        check_table_rope(config, "coreml", n)         # RoPE tables come from transformers' rotary module
        context = table_positions(config)
        if n is None:
            n = min(context or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
        if n < MIN_MAX_SEQ_LEN:
            raise UserError(f"--max-seq-len {n} is too short; the coreml target needs at least {MIN_MAX_SEQ_LEN}")
        if context and n > context:
            raise UserError(f"--max-seq-len {n} is above the model's context length ({context})")
        return {"max_seq_len": int(n)}

    def export(self, model_dir: Path, quant: str, out_tmp: Path, max_seq_len: int = DEFAULT_MAX_SEQ_LEN) -> list[str]:
        import gc

        from converters.coreml_program import expected_structure, read_and_check

        import_coremltools()
        wall = {}
        t = time.time()
        model, tokenizer, lowered = load_lowered(model_dir, max_seq_len)
        keys = lowered.compressible()
        wall["load"] = time.time() - t
        t = time.time()
        traced = trace(lowered)
        graph = graph_digest(traced)
        wall["trace"] = time.time() - t
        t = time.time()
        mlmodel = convert(traced, lowered)
        wall["convert"] = time.time() - t
        fallbacks: list = []
        if quant != "fp16":
            # Compression reads the program back from its weight files, so neither the fp32 module nor
            # the program in memory is needed meanwhile: both go (with them held, the 3B int4 export was
            # killed at 23 GB), and the module comes back for the parity check.
            del model, lowered, traced       # collected by compress(release=True)
            t = time.time()
            mlmodel, fallbacks = compress(mlmodel, quant, keys, release=True)
            wall["compress"] = time.time() - t
        t = time.time()
        package = Path(out_tmp) / PACKAGE
        mlmodel.save(str(package))
        del mlmodel
        wall["save"] = time.time() - t
        if quant != "fp16":
            gc.collect()
            t = time.time()
            model, tokenizer, lowered = load_lowered(model_dir, max_seq_len)
            traced = trace(lowered)
            if graph_digest(traced) != graph:
                raise ParityError("coreml: tracing the module again for the parity check gave another graph "
                                  "than the one converted")
            wall["reload for parity"] = time.time() - t
        expected = expected_structure(model.config, max_seq_len, quant, keys)
        report, problems = read_and_check(package, expected)
        if problems:
            raise ParityError("the saved Core ML program is incomplete: " + "; ".join(problems))
        self._runs[str(out_tmp)] = Run(model, tokenizer, lowered, traced, max_seq_len, report, expected,
                                       {k: round(v, 1) for k, v in wall.items()}, fallbacks)
        return [PACKAGE]

    def details(self, out_tmp: Path, files: list[str]) -> dict:
        from converters.coreml_program import read_program

        run = self._runs.get(str(out_tmp))
        report = run.report if run else read_program(Path(out_tmp) / files[0])
        state = report["states"].get("key_cache", {}).get("shape") or [None] * 5
        return {
            "package": files[0], "deployment_target": report["deployment_target"],
            "compute_precision": "fp16", "max_seq_len": state[3],
            "inputs": report["inputs"], "outputs": report["outputs"], "states": report["states"],
            "moe_lowering": "gather: the top-k experts' rows of the stacked expert weights, then batched matmuls",
            "moe_layers": {layer: e["experts"] for layer, e in report["moe_layers"].items()},
            "compression": report["compression"], "quant_fallbacks": run.fallbacks if run else [],
            "weight_file_mb": report["weight_file_mb"], "ops": report["ops"],
        }

    def parity(self, model_dir: Path, export_dir: Path, quant: str, threads: int | None = None,
               new_tokens: int = 32) -> dict:
        """The traced lowered module (fp32) against transformers; then the stored weights and fp16 proxy."""
        run = self._runs.get(str(export_dir))
        if run is None:
            raise RuntimeError("CoreMLExporter.parity needs the export made by export() in this process")
        try:
            return self._parity(run, model_dir, export_dir, quant, new_tokens)
        except BaseException:
            self._runs.pop(str(export_dir), None)
            raise

    def _parity(self, run: Run, model_dir: Path, export_dir: Path, quant: str, new_tokens: int) -> dict:
        import torch

        from converters.coreml_module import TorchRunner
        from converters.coreml_program import stored_weights
        from converters.phases import phase
        from converters.parity import PROMPTS, reference, score_text, text_gate_failure

        encoded = [run.tokenizer(p)["input_ids"] for p in PROMPTS]
        new_tokens = min(new_tokens, run.max_seq_len - max(len(ids) for ids in encoded))
        with phase("parity_reference"):      # shared with the run's other targets (converters.parity)
            _, encoded, refs, text_refs, shared = reference(model_dir, PROMPTS, new_tokens, run.max_seq_len,
                                                            loaded=(run.model, run.tokenizer))

        traced = TorchRunner(run.traced, run.max_seq_len, run.lowered.reset)
        result = compare(traced, encoded, refs, texts=PROMPTS)
        # Teacher-forced, the module was fed the reference's tokens; fed its own argmax instead, it sees the same
        # inputs exactly as long as every argmax equals the reference's token. So its free-running greedy
        # decoding is the reference's exactly when every teacher-forced step matched (no second pass needed).
        result["free_running_greedy_identical"] = result["greedy_match"] == result["greedy_total"]
        max_err, min_frac = FP32_TOLERANCE
        parity = {"checked_on": "pytorch-lowered-module",
                  "module": "the traced LoweredDecoder (the TorchScript graph converted to Core ML), fp32",
                  "reference": "transformers fp32, greedy", "kv_cache": "f32",
                  "tolerance": {"max_abs_logit_err": max_err, "min_greedy_fraction": min_frac}, **result,
                  "reference_shared": shared}
        if not (result["max_abs_logit_err"] <= max_err and result["greedy_match"] >= min_frac * result["greedy_total"]
                and result["free_running_greedy_identical"]):
            raise ParityError(f"coreml: the lowered PyTorch module (fp32) matches {result['greedy_match']}/"
                              f"{result['greedy_total']} greedy tokens of transformers, max |logit error| "
                              f"{result['max_abs_logit_err']:.3g} (allowed {max_err:g}, all tokens)")

        # The weights as the package stores them, decompressed, in the same module (fp32 compute).
        tensors = run.lowered.tensors_by_key()
        loaded = 0
        with torch.no_grad():
            for key, value in stored_weights(Path(export_dir) / PACKAGE).items():
                if key in tensors and tuple(tensors[key].shape) == tuple(value.shape):
                    tensors[key].copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))
                    loaded += 1
        eager = TorchRunner(run.lowered, run.max_seq_len, run.lowered.reset)
        stored = compare(eager, encoded, refs)
        tol = self.tolerance(quant, run.model.config)
        stored.update({"text": score_text(eager, text_refs), "tensors_loaded": loaded, "compute": "fp32",
                       "tolerance": tol.as_dict()})
        run.checks["stored_weights"] = stored
        if (why := text_gate_failure(stored["text"], tol)) is not None:
            raise ParityError(f"coreml {quant}: with the weights the package stores, the lowered module fails "
                              f"{why}; greedy {stored['greedy_match']}/{stored['greedy_total']} tokens")

        # fp16 compute proxy: PyTorch's CPU fp16 kernels, not Core ML's (which may accumulate in fp16).
        run.lowered.half()
        run.checks["fp16_compute_proxy"] = {**compare(eager, encoded, refs), "compute": "fp16 (PyTorch CPU)"}
        return parity

    def forget(self, export_dir: Path) -> None:
        self._runs.pop(str(export_dir), None)

    def verification(self, export_dir: Path, manifest: dict) -> dict:
        run = self._runs.pop(str(export_dir))
        report, expected, quant = run.report, run.expected, manifest["quant"]
        moe = report["moe_layers"]
        comp = report["compression"]
        parity, stored, proxy = manifest["parity"], run.checks["stored_weights"], run.checks["fp16_compute_proxy"]
        states = ", ".join(f"{n} {s['dtype']} {s['shape']}" for n, s in report["states"].items())
        experts = ", ".join(f"layer {k}: {v['experts']}" for k, v in moe.items())
        types = ", ".join(t for t in comp["stored_types"] if t != "fp16")
        ops = ", ".join(f"{n} {k}" for k, n in comp["ops"].items())
        checked = [
            f"program read back from the saved package ({report['deployment_target']}, {report['opset']}): inputs "
            f"{', '.join(report['inputs'])}; output {', '.join(report['outputs'])}; states "
            f"{states}; "
            f"{sum(report['state_writes'].values())} in-place state writes (write_state: one per attention layer and cache)",
            (f"all {len(moe)} MoE layers present with all their experts "
             f"({experts}), each selected by a gather"
             if moe else "no MoE layers in the model, none in the program"),
            (f"weight compression: all {len(expected['compressible'])} weight matrices (embedding / LM head, attention, "
             f"MLPs, every expert) stored as {types} ({ops}); routers, norms and RoPE tables fp16; weight file "
             f"{report['weight_file_mb']} MB"
             if quant != "fp16" else f"fp16 weights, weight file {report['weight_file_mb']} MB"),
            f"the traced lowered module (fp32) vs transformers: greedy {parity['greedy_match']}/"
            f"{parity['greedy_total']} teacher-forced, free-running identical: "
            f"{parity['free_running_greedy_identical']}, max |logit error| {parity['max_abs_logit_err']:.3g}",
            f"the package's stored weights (decompressed) in the lowered module, fp32 compute: fixed text top-1 "
            f"agreement {stored['text']['top1_agreement']:.3f} ({stored['text']['decisive_top1_agreement']} where the "
            f"reference is decisive), mean KL {stored['text']['mean_kl']:.3g} nats; greedy "
            f"{stored['greedy_match']}/{stored['greedy_total']}, max |logit error| {stored['max_abs_logit_err']:.3g}",
            f"fp16 compute proxy (PyTorch CPU kernels, stored weights): greedy {proxy['greedy_match']}/"
            f"{proxy['greedy_total']}, max |logit error| {proxy['max_abs_logit_err']:.3g}",
        ]
        return {
            "on_device": False,
            "checked": checked,
            "not_checked": [
                "Core ML prediction itself (needs macOS or iOS): Core ML's kernels, their fp16 accumulation and "
                "any graph rewrites it makes at load time",
                "speed, memory and load time on a device; which compute unit (Neural Engine, GPU, CPU) runs each op",
                "the state's behaviour across calls in the Core ML runtime (checked only in the traced module)",
            ],
            "expected": {k: v for k, v in expected.items() if k != "compressible"},
            "program": {k: report[k] for k in ("specification_version", "deployment_target", "opset", "state_writes",
                                               "moe_layers", "compression", "weight_file_mb")},
            "stored_weights": stored,
            "fp16_compute_proxy": proxy,
            "lowering": {
                "moe": "gather the top-k experts' stacked weights (exact; unselected experts are never computed)",
                "rms_norm": "scaled by max(|x|, 1) before squaring (the same function; no fp16 overflow)",
                "logits": "last position only",
            },
            "export_wall_s": run.wall_s,
        }


def load_lowered(model_dir: Path, max_seq_len: int):
    from converters.coreml_module import LoweredDecoder
    from d2m_export.sources.models import load_model

    model, tokenizer, _ = load_model(model_dir, dtype="float32")
    return model, tokenizer, LoweredDecoder(model, max_seq_len).eval()


def compare(runner, encoded: list[list[int]], refs: list, texts=None) -> dict:
    """Teacher-forced comparison of `runner` with the reference greedy tokens and logits."""
    from converters.parity import runtime_forced

    per_prompt = []
    for i, (ids, (tokens, logits)) in enumerate(zip(encoded, refs)):
        got = runtime_forced(runner, ids, tokens)
        row = {"prompt_tokens": len(ids), "max_abs_logit_err": float(np.abs(got - logits).max()),
               "greedy_match": int((got.argmax(-1) == np.array(tokens)).sum()), "greedy_total": len(tokens)}
        if texts is not None:
            row = {"text": texts[i], **row, "reference_tokens": tokens}
        per_prompt.append(row)
    return {"max_abs_logit_err": max(p["max_abs_logit_err"] for p in per_prompt),
            "greedy_match": sum(p["greedy_match"] for p in per_prompt),
            "greedy_total": sum(p["greedy_total"] for p in per_prompt), "prompts": per_prompt}


def free_greedy(runner, prompt_ids: list[int], n: int) -> list[int]:
    """The runner's own greedy decoding (its argmax fed back), n tokens."""
    out = [int(np.argmax(runner.prefill(prompt_ids)))]
    while len(out) < n:
        out.append(int(np.argmax(runner.decode(out[-1]))))
    return out
