"""ExecuTorch: one `.pte` lowered to XNNPACK with a static KV cache; MoE decode reads only the selected experts.

The program (`model.pte`) has the interface of ExecuTorch's own Llama export, so its LLM runner
(`llama_main`, the Android `LlmModule`) runs it unchanged:
- `forward(tokens int64 [1, T], input_pos int64 [1]) -> logits float32 [1, vocab]` of the last position,
  T from 1 to `max_seq_len` (prefill in one call; decode T = 1); the KV cache lives in the program;
- constant methods `get_max_seq_len`, `get_max_context_len`, `get_vocab_size`, `get_bos_id`, `get_eos_ids`,
  `use_kv_cache`, `use_sdpa_with_kv_cache`, `enable_dynamic_shape`.
The decoder itself is `converters.executorch_model`; how MoE layers are lowered is explained there.
Programs use `llama::update_cache` / `llama::custom_sdpa`, which a runtime registers by importing
`executorch.extension.llm.custom_ops` (the runner does) or linking ExecuTorch's custom-ops library.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from converters.base import Exporter, exact, lossy, register_target
from converters.executorch_build import (build_program_no_grad, lowering_without_copies,  # noqa: F401 (tests)
                                         program_summary)
from d2m_export.errors import UserError
from d2m_export.sources.models import read_config
from d2m_export.outputs import die_with_parent

log = logging.getLogger(__name__)
PROGRAM = "model.pte"
ARCHS = ("llama", "qwen2", "qwen3", "gemma3_text", "smollm3", "olmo2", "qwen2_moe", "qwen3_moe")
DEFAULT_MAX_SEQ_LEN = 4096 + 64   # a 4096-token context and 64 decoded tokens (at most the model's)
MIN_MAX_SEQ_LEN = 64            # the parity check decodes ~60 positions


def _require_executorch():
    try:
        import executorch  # noqa: F401
    except ImportError:
        raise UserError("the executorch target needs ExecuTorch: pip install 'd2m-export[executorch]'") from None


def special_ids(model_dir: Path, config: dict) -> tuple[int | None, list[int]]:
    """(BOS id, EOS ids) from config.json and generation_config.json."""
    eos: list[int] = []
    bos = config.get("bos_token_id")
    sources = [config]
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        try:
            sources.append(json.loads(gen.read_text()))
        except ValueError:
            pass
    for src in sources:
        value = src.get("eos_token_id")
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and i not in eos:
                eos.append(i)
        if bos is None and isinstance(src.get("bos_token_id"), int):
            bos = src["bos_token_id"]
    return bos, eos


@register_target("executorch")
class ExecuTorchExporter(Exporter):
    description = "ExecuTorch (XNNPACK): .pte with static KV cache; MoE experts as delegates selected by cond"
    quants = ("fp32", "8da4w", "8da8w")
    default_quant = "fp32"
    options = ("max_seq_len", "moe_lowering")
    # fp32 runs the same arithmetic in another order: exact. Lossy quants are gated on the fixed text
    # (converters.parity): mean KL about twice the worst of SmolLM2-135M dense, LF-UC 0.8 unhealed and healed,
    # top-1 agreement where the reference is decisive below the worst agreement over all positions
    # (bench/results/parity_gates_smollm2.md). Worst: 8da8w 0.888 / 0.060 nats, 8da4w 0.514 / 0.907.
    artifact_bytes_per_param = {"fp32": 4.0, "8da8w": 1.1, "8da4w": 0.6}
    # Beyond the model and the artifact in its runtime: the build holds the program's weights in fp32 once
    # (in a process of its own); the runtime holds XNNPACK's packed weights beside the mapped program
    # (1.57x the program at fp32 on a 1.24B model). Measured in bench/results/scale.md.
    toolchain_fp32_copies = {"fp32": 0.4, "8da8w": 0.7, "8da4w": 0.7}
    tolerances = {"fp32": exact(1e-2), "8da8w": lossy(0.85, 0.1), "8da4w": lossy(0.35, 1.4)}

    def check_options(self, config: dict, options: dict) -> dict:
        """Refuse what this target cannot export, and bad options, before anything is written."""
        from converters.executorch_model import LOWERINGS
        from d2m_export.architectures import check_table_rope, table_positions

        max_seq_len, moe_lowering = options.get("max_seq_len"), options.get("moe_lowering")

        _require_executorch()
        model_type = config.get("model_type")
        if model_type not in ARCHS:
            raise UserError(f"the executorch target exports {', '.join(ARCHS)} models, not {model_type!r}")
        if config.get("use_sliding_window"):
            raise UserError("sliding-window attention is not supported by the executorch target")
        check_table_rope(config, "executorch", max_seq_len)   # RoPE tables come from transformers' rotary module
        context = table_positions(config) or DEFAULT_MAX_SEQ_LEN
        if max_seq_len is not None:
            if not MIN_MAX_SEQ_LEN <= max_seq_len <= context:
                raise UserError(f"--max-seq-len {max_seq_len} must be between {MIN_MAX_SEQ_LEN} and the model's "
                                f"context length {context}")
        if moe_lowering is not None and moe_lowering not in LOWERINGS:
            raise UserError(f"--moe-lowering must be one of {', '.join(LOWERINGS)}, not {moe_lowering!r}")
        return options

    def export(self, model_dir: Path, quant: str, out_tmp: Path, max_seq_len: int | None = None,
               moe_lowering: str | None = None) -> list[str]:
        from concurrent.futures.process import BrokenProcessPool

        from d2m_export.architectures import table_positions

        config = read_config(Path(model_dir))
        self.check_options(config, {"max_seq_len": max_seq_len, "moe_lowering": moe_lowering})
        max_seq_len = max_seq_len or min(table_positions(config) or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
        moe_lowering = moe_lowering or "cond"
        bos, eos = special_ids(Path(model_dir), config)
        metadata = {"get_max_seq_len": max_seq_len, "get_max_context_len": max_seq_len,
                    "get_vocab_size": int(config["vocab_size"]), "use_kv_cache": True,
                    "use_sdpa_with_kv_cache": True, "enable_dynamic_shape": True}
        if bos is not None:
            metadata["get_bos_id"] = int(bos)
        if eos:
            metadata["get_eos_ids"] = eos
        t0 = time.time()
        # In a process of its own: what the toolchain leaves behind (it keeps more than the program it
        # returns) goes back to the system before the parity check loads the reference and the runtime.
        try:
            with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
                facts = pool.submit(build_program_no_grad, Path(model_dir), Path(out_tmp) / PROGRAM, max_seq_len,
                                    quant, moe_lowering, metadata).result()
        except BrokenProcessPool:
            raise RuntimeError("the process building the ExecuTorch program died (killed for memory?)") from None
        self._facts = {**facts, "export_s": round(time.time() - t0, 1),
                       "metadata": metadata, "max_seq_len": max_seq_len, "moe_lowering": moe_lowering}
        return [PROGRAM]

    def details(self, out_tmp: Path, files: list[str]) -> dict:
        facts = dict(getattr(self, "_facts", {}))
        return {"program": files[0], "methods": program_summary(Path(out_tmp) / files[0]),
                "forward": {"inputs": ["tokens int64 [1, T], 1 <= T <= max_seq_len", "input_pos int64 [1]"],
                            "output": "logits float32 [1, vocab] (last position)"},
                "custom_ops": ["llama::update_cache", "llama::custom_sdpa"], **facts}


# --------------------------------------------------------------------------------------------
# `d2m-export --target executorch` alone: the main job on the embedded default model
# --------------------------------------------------------------------------------------------
GREEDY_PROMPT = "The capital of France is"


def main_job(out: Path, quant: str | None = None, threads: int = 2, ratio: float = 0.8,
             prompt_tokens: int = 64, new_tokens: int = 64, repeats: int = 3, heal_steps: int = 150,
             rounds: int = 10) -> dict:
    """LF-UC convert and heal (default plan at `ratio`) → export dense and LF-UC → parity (inside
    export) → bench both side by side; print where the bundle is, the healed model's perplexity and
    its decode speed against the dense model's, and a greedy continuation from the bundle."""
    from converters.base import export
    from d2m_export.sources.models import DEFAULT_MODEL, resolve_model
    from d2m_export.outputs import write_json
    from d2m_export.sources.params import param_counts
    from d2m_export.heal import HealConfig
    from d2m_export.pipeline import convert, evaluate
    from runtimes.base import load_runner, load_tokenizer
    from runtimes.bench import interleaved
    _require_executorch()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    quant = quant or ExecuTorchExporter.default_quant
    timings = {}

    def step(name, fn, *args, **kwargs):
        print(f"== {name}", flush=True)
        t0 = time.time()
        result = fn(*args, **kwargs)
        timings[name] = round(time.time() - t0, 1)
        return result

    lfuc_dir = out / f"lfuc-{ratio}"
    record = step(f"convert + heal lfuc @{ratio}", convert, DEFAULT_MODEL, lfuc_dir, method_name="lfuc",
                  target_ratio=ratio, heal=HealConfig(steps=heal_steps))
    ppl = {name: step(f"perplexity {name}", evaluate, spec, None, tasks=[], limit=None)["perplexity"]
           for name, spec in (("dense", DEFAULT_MODEL), ("lfuc", str(lfuc_dir)))}
    bundles = {"dense": out / f"dense-{quant}", "lfuc": out / f"lfuc-{ratio}-{quant}"}
    manifests = {"dense": step("export dense", export, "executorch", DEFAULT_MODEL, quant, bundles["dense"],
                               threads=threads),
                 "lfuc": step("export lfuc", export, "executorch", str(lfuc_dir), quant, bundles["lfuc"],
                              threads=threads)}
    def bench(name, path):     # its own process: peak RSS is then the runtime's, not this export's
        result = out / f"bench-{name}.json"
        subprocess.run([sys.executable, "-m", "d2m_export.cli", "bench", str(path), "--prompt-tokens", str(prompt_tokens),
                        "--new-tokens", str(new_tokens), "--threads", str(threads), "--repeats", str(repeats),
                        "--out", str(result)], check=True, stdout=subprocess.DEVNULL)
        return json.loads(result.read_text())

    speeds = {name: step(f"bench {name}", bench, name, path) for name, path in bundles.items()}
    # the speed-up from alternating rounds in one process: single whole-process runs drift on a busy machine
    ab = step("alternating decode rounds", interleaved, bundles, rounds=rounds, prompt_tokens=prompt_tokens,
              threads=threads)
    dense_active = param_counts(read_config(resolve_model(DEFAULT_MODEL))).active
    lfuc_active = param_counts(read_config(lfuc_dir)).active
    speedup, spread = ab["speedups"]["lfuc over dense"]["median"], ab["speedups"]["lfuc over dense"]["spread"]
    with load_runner(bundles["lfuc"], threads=threads) as runner:
        greedy = runner.greedy_text(load_tokenizer(bundles["lfuc"]), GREEDY_PROMPT, 32)
    summary = {"model": DEFAULT_MODEL, "ratio": ratio, "quant": quant, "threads": threads, "plan": record["plan"],
               "bundles": {k: str(v) for k, v in bundles.items()},
               "parity": {k: {f: m["parity"][f] for f in ("greedy_match", "greedy_total", "max_abs_logit_err")}
                          for k, m in manifests.items()},
               "bench": speeds, "decode_speedup": round(speedup, 3), "decode_speedup_rounds": ab,
               "perplexity": {k: round(v["value"], 3) for k, v in ppl.items()}, "perplexity_corpus":
               f"{ppl['dense']['corpus']}, {ppl['dense']['tokens']} tokens", "healing": record.get("healing"),
               "greedy": {"prompt": GREEDY_PROMPT, "text": greedy},
               "roofline_speedup": round(dense_active / lfuc_active, 3),
               "active_params": {"dense": dense_active, "lfuc": lfuc_active}, "timings_s": timings}
    write_json(out / "summary.json", summary)
    p = summary["parity"]["lfuc"]
    print(f"\nExecuTorch bundle (LF-UC @{ratio}, healed, {quant}): {bundles['lfuc']}")
    print(f"  perplexity ({summary['perplexity_corpus']}): LF-UC {ppl['lfuc']['value']:.2f} vs dense "
          f"{ppl['dense']['value']:.2f}")
    print(f"  parity vs transformers: greedy {p['greedy_match']}/{p['greedy_total']}, "
          f"max |logit error| {p['max_abs_logit_err']:.3g}")
    ms = {k: v["decode_ms_per_token"] for k, v in ab["variants"].items()}
    print(f"  decode ({threads} threads, {rounds} alternating rounds): LF-UC {1000 / ms['lfuc']:.1f} tok/s vs dense "
          f"{1000 / ms['dense']:.1f} tok/s = {speedup:.2f}x (rounds {spread[0]:.2f}–{spread[1]:.2f}x; roofline "
          f"from active params: {summary['roofline_speedup']:.2f}x)")
    print(f"  greedy, 32 tokens from the bundle: {GREEDY_PROMPT!r} →{greedy!r}")
    print(f"  summary: {out / 'summary.json'}")
    return summary
