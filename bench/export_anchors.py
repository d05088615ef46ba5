"""The runtimes' own export tools ("anchors") that bench/export_time.py times against ours: their command lines.

Each anchor is a list of (label, argv) parts, each run in its own process; a target whose runtime has no
such tool raises NoAnchor with the reason, which the table prints.
"""
from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path

from sidebyside import ROOT

# The documented llama.cpp flow: the converter writes f16 (its default outtype), `llama-quantize` makes the type.
GGUF_INTERMEDIATE = "f16"
# `llama-quantize` as a process of its own: llama.cpp's quantizer through llama-cpp-python (converters.gguf).
QUANTIZE = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[4]); "
            "from converters.gguf import llama_quantize; llama_quantize(Path(sys.argv[1]), Path(sys.argv[2]), "
            "int(sys.argv[3]))")
# The bench/scale.py shapes pair a Qwen2 config with SmolLM2's tokenizer.json. transformers 5 loads it for a
# qwen2 model as Qwen2's tokenizer class, which rebuilds the pre-tokenizer as Qwen2's, whose hash llama.cpp's
# converter then does not find among SmolLM2's; a real Qwen2.5 checkpoint has Qwen2's own tokenizer and no such
# mismatch. So the converter runs with AutoTokenizer taking tokenizer.json as stored (SmolLM2's, which it knows).
AS_STORED = ("import os, runpy, sys, transformers; "
             "transformers.AutoTokenizer.from_pretrained = lambda path, *a, **k: "
             "transformers.PreTrainedTokenizerFast.from_pretrained(path); "
             "sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0]))); "
             "runpy.run_path(sys.argv[0], run_name='__main__')")
COREML_ANCHOR_DTYPE = "float16"
LABELS = {"gguf": f"llama.cpp convert_hf_to_gguf.py ({GGUF_INTERMEDIATE}) + llama.cpp quantizer",
          "onnx": "onnxruntime-genai model builder", "executorch": "optimum-executorch (optimum-cli)",
          "coreml": "coremltools' documented flow (bench/coreml_anchor.py: trace, ct.convert, ct.optimize.coreml)"}


class NoAnchor(Exception):
    """The runtime has no export tool of its own to time for this row (the message says why)."""


def gguf_parts(model: Path, quant: str, out: Path, work: Path, max_seq_len: int) -> list[tuple[str, list]]:
    import gguf

    from converters.gguf import K_QUANTS
    from gguf_smollm2 import llama_cpp_converter

    script = llama_cpp_converter(work)
    file_type = K_QUANTS.get(quant) or getattr(gguf.LlamaFileType, f"MOSTLY_{quant.upper()}")
    intermediate = out / f"model-{GGUF_INTERMEDIATE}.gguf"
    return [(f"convert_hf_to_gguf.py --outtype {GGUF_INTERMEDIATE}",
             [sys.executable, "-c", AS_STORED, script, model, "--outtype", GGUF_INTERMEDIATE, "--outfile",
              intermediate]),
            (f"llama.cpp quantizer ({GGUF_INTERMEDIATE} -> {quant})",
             [sys.executable, "-c", QUANTIZE, intermediate, out / f"model-{quant}.gguf", int(file_type), ROOT])]


def onnx_parts(model: Path, quant: str, out: Path, work: Path, max_seq_len: int) -> list[tuple[str, list]]:
    return [(f"python -m onnxruntime_genai.models.builder -p {quant} -e cpu",
             [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", model, "-o", out, "-p", quant,
              "-e", "cpu", "-c", work / "builder-cache"])]


def executorch_parts(model: Path, quant: str, out: Path, work: Path, max_seq_len: int) -> list[tuple[str, list]]:
    from executorch_smollm2 import OPTIMUM_PINS
    from sidebyside import make_venv

    # optimum-executorch pins its own transformers: a side venv, made once (bench/executorch_smollm2.py)
    venv = make_venv(work / "optimum-et-venv", *OPTIMUM_PINS, f"executorch=={version('executorch')}")
    # ours quantizes every linear in groups of 32 (converters/executorch_model.py) with the same KV cache length
    return [(f"optimum-cli export executorch --recipe xnnpack --qlinear {quant}",
             [venv / "bin" / "optimum-cli", "export", "executorch", "--model", model, "--task", "text-generation",
              "--recipe", "xnnpack", "--qlinear", quant, "--qlinear_group_size", 32, "--use_custom_sdpa",
              "--use_custom_kv_cache", "--max_seq_len", max_seq_len, "--output_dir", out])]


def coreml_parts(model: Path, quant: str, out: Path, work: Path, max_seq_len: int) -> list[tuple[str, list]]:
    # coremltools ships no converter for a Hugging Face causal LM: the script is its documented flow as a user
    # writes it, without a KV cache (less work than ours), from fp16 weights (from fp32 it needs more than 23.5 GB
    # at the 3B shape and is killed; fp16 is also the faster of the two)
    return [(f"bench/coreml_anchor.py --quant {quant} --dtype {COREML_ANCHOR_DTYPE}",
             [sys.executable, ROOT / "bench" / "coreml_anchor.py", model, out / "model.mlpackage", "--quant", quant,
              "--max-seq-len", max_seq_len, "--dtype", COREML_ANCHOR_DTYPE])]


PARTS = {"gguf": gguf_parts, "onnx": onnx_parts, "executorch": executorch_parts, "coreml": coreml_parts}
