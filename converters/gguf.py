"""GGUF for stock llama.cpp: dense Llama/Qwen2/Qwen3 as llama.cpp's own converter writes them, LF-UC MoE as
`hy_v3` (from Qwen3) or `step35` (from Llama/Qwen2).

Dense models use the `llama` architecture (Llama; q/k rows re-ordered from rotate-half to
llama.cpp's adjacent-pair RoPE layout), `qwen2` or `qwen3` (NEOX RoPE: weights as they are; Qwen3's
per-head q/k norms as `attn_q_norm` / `attn_k_norm`).

Our Qwen2-MoE and Qwen3-MoE outputs mix dense and MoE layers freely, which no Qwen-family
architecture in llama.cpp accepts. `step35` does, exactly (DESIGN.md §3): a layer is MoE when it has
`ffn_gate_inp`, else it runs its dense `ffn_*`; shared experts are always on and ungated;
RoPE is NEOX. Its pitfalls, each handled below or in gguf_tensors.py:
1. its KV cache is always the sliding-window kind and needs one SWA layer: the last layer is
   flagged SWA with a window no context reaches, i.e. full attention;
2. full-attention layers use half of `rope.dimension_count`: write 2 × head_dim there and
   head_dim as `rope.dimension_count_swa` (and the same `rope.freq_base_swa`);
3. gating must be set to softmax with renormalisation explicitly (its default is sigmoid);
4. the shared expert has no gate: Qwen2MoE's zero `shared_expert_gate` gives sigmoid(0) = 0.5,
   folded into `ffn_down_shexp`;
5. a MoE layer without shared-expert tensors would add silu(x) (llama.cpp's FFN with no
   weights is the activation alone), so the routed-host variant and Qwen3-MoE (which has no
   shared expert) get a zero shared expert of width 1;
6. `output.weight` is required (step35.cpp loads it with no TENSOR_NOT_REQUIRED and no fallback to the
   token embedding): tied models store a copy, which is why Qwen3-MoE goes to `hy_v3` (below);
7. q/k/v biases (LF-UC of a Qwen2 model) are optional step35 tensors, added by llama.cpp's shared
   q/k/v projection (`build_qkv`) in the llama.cpp that llama-cpp-python 0.3.36 bundles. A build
   whose step35 graph projects without them would run such a file with the biases left out:
   the manifest names the llama.cpp it was checked with (`gguf.checked_with`).

Qwen3-MoE uses `hy_v3` instead: the same per-layer choice (a layer with `ffn_gate_inp` is MoE, else its
dense `ffn_*` runs), the same always-on ungated shared expert (so 4. and 5. apply), and NEOX RoPE, but
`output.weight` is optional (a tied model stores its embedding once, as the dense export does) and its
KV cache is the ordinary one (no SWA flag, full RoPE dimension). Its q/k norms are required, which is
why it takes only Qwen3: no llama.cpp architecture that falls back to the token embedding mixes dense
and MoE layers without them (gemma4 normalises V, jamba and nemotron-h have no RoPE), so LF-UC of a tied
Llama or Qwen2 model still stores its embedding twice.

RoPE: default and linear as metadata (linear not for the mixed architectures). Llama 3's `llama3` RoPE
rescales each frequency on its own; llama.cpp takes that, as its own converter writes it, as a
`rope_freqs.weight` tensor of per-dimension divisors (θ_i / f_i), which `llama` and `step35` read. Here the
divisors are transformers' default inverse frequencies over the ones its own llama3 init computes for the
config, so llama.cpp's frequencies are transformers'. step35 gives its SWA-flagged layer no divisors (1.
above), so with llama3 RoPE no real layer is flagged: an identity layer is appended instead and flagged
SWA — one head, norms zero (q = k = v = 0, and the FFN input is 0, whose activation with no FFN weights
is silu(0) = 0), attention output zero — which adds exactly 0 to the residual stream (4·head_dim·hidden
weights: 2 MB at f32 for Llama 3.2 1B, 0.04% of the file).
`qwen2`, `qwen3`, `hy_v3` and `gemma3` read no divisors: llama3 RoPE is refused there.

Dense Gemma 3 uses llama.cpp's `gemma3`, which fixes three things that transformers configures:
every 6th layer is global and the others slide (refused when a model's `layer_types` differ, as
after pruning), the local RoPE base is 10000 (refused otherwise), and the softmax scale is
1/√head_dim (query_pre_attn_scalar differs: the ratio is folded into the q norm, exactly).
Norm weights are stored as the scale they apply (1 + w), as llama.cpp's converter does.
"""
from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np

from converters.base import Exporter, exact, lossy, register_target
from converters.phases import phase
from converters.gguf_rope import (FREQ_FACTOR_ROPE, MIXED_MOE, check_gemma3, check_rope, check_smollm3,
                                  rope_freq_factors, rope_supported, rope_theta)
from converters.gguf_tensors import (REQUIRES_OUTPUT, Q, T, all_tensors, identity_swa_layer,  # noqa: F401 (Q: tests)
                                     quantize_in_rows, stored_layout, tensor_type, tname)
from converters.gguf_vocab import add_vocab
from d2m_export.architectures import table_positions
from d2m_export.errors import UserError
from d2m_export.sources.models import read_config
from d2m_export.sources.views import source_name

log = logging.getLogger(__name__)
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
# k-quants are llama.cpp's mixes (which tensor gets which type, fallbacks for rows that are not a
# multiple of 256): made by llama.cpp's own quantizer from the f32 file, never re-implemented here
K_QUANTS = {"q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M, "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
            "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K}
ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3",  # HF model_type -> GGUF
         "smollm3": "smollm3", "olmo2": "olmo2", "qwen2_moe": "step35", "qwen3_moe": "hy_v3"}
SWA_WINDOW = 1 << 20      # "sliding" window of the one SWA-flagged step35 layer: wider than any context


def load_state(model_dir: Path):
    """The weights as fp32 numpy arrays, read lazily from the model held in its stored dtype, and the config."""
    from d2m_export.sources.lazy_weights import Float32Arrays
    from d2m_export.sources.models import load_model

    model, _, _ = load_model(model_dir)       # any load failure is a one-line UserError
    return Float32Arrays(model), model.config


def check_rope_config(config: dict) -> None:
    """Refuse, from config.json alone and before any work, RoPE that stock llama.cpp cannot run exactly
    for the architecture this model goes to: one line naming the target and the RoPE type."""
    from d2m_export.architectures import rope_types

    arch = ARCHS.get(config.get("model_type"))
    if arch is None:
        return
    for kind in rope_types(config):
        if not rope_supported(kind, arch):
            why = (f"llama.cpp's {arch} reads no per-dimension RoPE frequencies (rope_freqs)"
                   if kind in FREQ_FACTOR_ROPE else f"no stock llama.cpp {arch} equivalent is written yet")
            raise UserError(f"RoPE type {kind!r} is not supported by the gguf target for {config['model_type']} "
                            f"models: {why}")
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UserError(f"partial rotary RoPE (partial_rotary_factor {partial}) is not supported by the gguf "
                        "target yet")


def add_metadata(w: gguf.GGUFWriter, cfg, arch: str, quant: str, name: str) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = check_rope(cfg, arch)
    w.add_name(name)
    w.add_context_length(table_positions(cfg))     # longrope: exact up to its original context (gguf_rope)
    w.add_embedding_length(cfg.hidden_size)
    n, identity = cfg.num_hidden_layers, identity_swa_layer(cfg, arch)
    w.add_block_count(n + identity)
    w.add_feed_forward_length(cfg.intermediate_size)
    if identity:      # the appended identity layer has one head (and one KV head)
        w.add_head_count([cfg.num_attention_heads] * n + [1])
        w.add_head_count_kv([cfg.num_key_value_heads] * n + [1])
    else:
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(rope["rope_theta"]) if arch == "gemma3" else rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if arch == "llama":
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(head_dim)
    if arch in MIXED_MOE or getattr(cfg, "head_dim", None) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "hy_v3":
        w.add_rope_dimension_count(head_dim)
    if arch == "step35":
        w.add_rope_dimension_count(2 * head_dim)                  # halved by llama.cpp for full attention
        w.add_rope_dimension_count_swa(head_dim)
        w.add_rope_freq_base_swa(rope_theta(cfg))
        w.add_sliding_window(max(SWA_WINDOW, cfg.max_position_embeddings))
        w.add_sliding_window_pattern([i == n + identity - 1 for i in range(n + identity)])
    if arch in MIXED_MOE:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(getattr(cfg, "shared_expert_intermediate_size", 0) or 1)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
        w.add_expert_weights_norm(bool(cfg.norm_topk_prob))
        w.add_expert_weights_scale(1.0)
    w.add_file_type(FILE_TYPES[quant])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def rope_details(cfg, arch: str) -> dict:
    """The manifest's account of how the file holds the model's RoPE."""
    params = check_gemma3(cfg) if arch == "gemma3" else dict(getattr(cfg, "rope_parameters", None) or {})
    out = {"type": params.get("rope_type", "default")}
    if rope_freq_factors(cfg) is not None:
        out["frequency_divisors"] = tname(T.ROPE_FREQS)
    if identity_swa_layer(cfg, arch):
        out["identity_swa_layer"] = cfg.num_hidden_layers      # appended, flagged SWA, adds exactly 0
    return out


def head_tensor(names: list[str]) -> str:
    """The tensor llama.cpp multiplies the final hidden state with (the token embedding when tied)."""
    return tname(T.OUTPUT) if tname(T.OUTPUT) in names else tname(T.TOKEN_EMBD)


@register_target("gguf")
class GGUFExporter(Exporter):
    description = ("llama.cpp (GGUF): llama/qwen2/qwen3/gemma3/smollm3/olmo2 for dense models, hy_v3 or step35 for "
                   "LF-UC mixtures")
    quants = ("f32", "f16", "q8_0", "q4_0", *K_QUANTS)
    default_quant = "f32"
    # Lossy quants are gated on the fixed text (converters.parity): top-1 agreement where the reference is
    # decisive about 0.1 below the worst of SmolLM2-135M dense, LF-UC 0.8 unhealed and healed, mean KL about
    # twice the worst (at least 0.005 nats); bench/results/parity_gates_smollm2.md. Worst: f16, q8_0, q6_k
    # 1.0 / 0.0005, 0.014, 0.028 nats; q5_k_m 0.956 / 0.187; q4_k_m 0.964 / 0.133; q4_0 0.811 / 0.540.
    artifact_bytes_per_param = {"f32": 4.0, "f16": 2.0, "q8_0": 1.0625, "q4_0": 0.5625, "q4_k_m": 0.6,
                                "q5_k_m": 0.69, "q6_k": 0.82}
    tolerances = {"f32": exact(1e-2), "f16": lossy(0.9, 0.005), "q8_0": lossy(0.9, 0.03), "q4_0": lossy(0.7, 1.1),
                  "q6_k": lossy(0.9, 0.06), "q5_k_m": lossy(0.85, 0.4), "q4_k_m": lossy(0.85, 0.3)}

    # ggml's CPU GELU reads an fp16 table (x rounded to fp16), ~1e-3 relative per activation: a GeGLU
    # model (Gemma 3) at f32 is off by up to ~1e-2 on real weights (measured: 0.0105 on Gemma 3 270M)
    GELU_F32_MAX_ERR = 5e-2

    def __init__(self):
        self._written: dict[str, dict] = {}      # artifact path -> facts about it, for `details`

    def check_options(self, config: dict, options: dict) -> dict:
        check_rope_config(config)
        if config.get("model_type") == "smollm3" and config.get("no_rope_layers"):
            check_smollm3(config["no_rope_layers"])
        return options

    def tolerance(self, quant, config):
        tol = self.tolerances[quant]
        if quant == "f32" and "gelu" in str(getattr(config, "hidden_activation", None) or config.hidden_act):
            tol = tol._replace(max_abs_logit_err=max(tol.max_abs_logit_err, self.GELU_F32_MAX_ERR))
        return tol

    def export(self, model_dir: Path, quant: str, out_tmp: Path) -> list[str]:
        model_type = read_config(model_dir).get("model_type")
        if model_type not in ARCHS:
            raise UserError(f"the gguf target exports {', '.join(ARCHS)} models, not {model_type!r}")
        if model_type == "qwen2" and read_config(model_dir).get("use_sliding_window"):
            raise UserError("Qwen2 models with use_sliding_window are not supported by the gguf target yet")
        from d2m_export.sources.lazy_weights import Float32Shapes

        with phase("load"):
            state, cfg = load_state(model_dir)
        arch = ARCHS[model_type]
        filename = f"model-{quant}.gguf"
        written = "model-f32.source.gguf" if quant in K_QUANTS else filename
        writer = gguf.GGUFWriter(Path(out_tmp) / written, arch)
        add_metadata(writer, cfg, arch, "f32" if quant in K_QUANTS else quant, source_name(model_dir))
        pre = add_vocab(writer, model_dir, cfg.vocab_size)
        # Streamed: a first pass learns every tensor's name and shape (the header comes first in the
        # file) without making the large ones, a second makes, quantizes and writes them one at a time.
        shapes = [(name, data.shape) for name, data in all_tensors(Float32Shapes(state), cfg, arch)]
        head = head_tensor([n for n, _ in shapes])
        types: dict[str, int] = {}
        deviations, qtypes = [], []
        for name, shape in shapes:
            qtype, why = tensor_type(name, shape, "f32" if quant in K_QUANTS else quant, head)
            types[qtype.name] = types.get(qtype.name, 0) + 1
            if why:
                deviations.append({"tensor": name, "type": qtype.name, "why": why})
            qtypes.append(qtype)
            writer.add_tensor_info(name, *stored_layout(shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with phase("convert"):    # streamed: each tensor made, quantized (but k-quants) and written in turn
            for (name, data), qtype in zip(all_tensors(state, cfg, arch), qtypes):
                writer.write_tensor_data(quantize_in_rows(np.ascontiguousarray(data, dtype=np.float32), qtype))
            writer.close()
        del state
        if quant in K_QUANTS:
            with phase("quantize"):
                llama_quantize(Path(out_tmp) / written, Path(out_tmp) / filename, K_QUANTS[quant])
            types, deviations = tensor_types(Path(out_tmp) / filename), []
        self._written[str(Path(out_tmp) / filename)] = {
            "quantized_by": "llama.cpp's quantizer, from f32" if quant in K_QUANTS else "d2m-export (gguf-py)",
            "architecture": arch, "tokenizer_pre": pre, "tensor_types": types, "quant_fallbacks": deviations,
            # step35 and olmo2 have no fallback from the LM head to the token embedding: tied models store it twice
            "output_copies_embedding": arch in REQUIRES_OUTPUT and bool(cfg.tie_word_embeddings),
            "rope": rope_details(cfg, arch),
            "checked_with": checked_with()}
        return [filename]

    def details(self, out_tmp: Path, files: list[str]) -> dict:
        return self._written.pop(str(Path(out_tmp) / files[0]), {})


def llama_quantize(src: Path, dst: Path, file_type: int) -> None:
    """llama.cpp's quantizer (through llama-cpp-python, no separate build): `src` -> `dst`; `src` is removed."""
    import ctypes

    from runtimes.base import quiet_native_stderr
    try:
        import llama_cpp
    except ImportError:
        raise UserError("k-quants are made by llama.cpp's quantizer: pip install 'd2m-export[gguf]'") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    with quiet_native_stderr():
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if status != 0:
        raise UserError(f"llama.cpp's quantizer failed on {src.name} (status {status}); rerun with -v to see its log")
    src.unlink()


def checked_with() -> str | None:
    """The llama.cpp the parity check runs (llama-cpp-python's bundled build), when it is installed."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"llama-cpp-python {version('llama_cpp_python')}"
    except PackageNotFoundError:
        return None


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type a GGUF file holds."""
    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts
