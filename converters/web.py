"""The web: a folder that transformers.js (`@huggingface/transformers` 4.x) loads from local files, in the
browser (onnxruntime-web: WebAssembly, or WebGPU) and in Node (onnxruntime-node).

Layout, as transformers.js looks for it (`from_pretrained(folder, {local_files_only: true})`):

    config.json                  the model's, plus `transformers.js_config`: the dtype below and how many
                                 external data files the graph has (`use_external_data_format`)
    generation_config.json, tokenizer.json, tokenizer_config.json, ...
    onnx/model{suffix}.onnx      the decoder graph; suffix by --quant: fp32 '', fp16 '_fp16', q8 '_quantized', q4 '_q4'
    onnx/model{suffix}.onnx_data its weights (then `_data_1`, `_data_2`, ... past CHUNK_BYTES each: a browser
                                 holds each file in one buffer); the location stored in the graph is the file's name
    index.html, page.js          a page that runs the folder in the browser (`web/page/`; `d2m-export serve DIR`
                                 serves it with the runtime's files: `runtimes.web_server`)

The graph is the onnx target's (`converters.onnx_graph`), with the interface transformers.js feeds:
`input_ids`, `attention_mask`, `position_ids`, `past_key_values.N.key/value`, `num_logits_to_keep` -> `logits`,
`present.N.key/value` (`generate()` feeds num_logits_to_keep 1: a prompt's LM head runs on its last position
only, so a long prompt never holds [prompt, vocab] logits in WebAssembly's memory). GroupQueryAttention appends each step's keys and values to the past it is given, so
the cache grows by the step's length (transformers.js reads the past length from dims[-2]); its first,
empty past takes the declared head size. MoE layers route in plain ONNX, exact on every execution provider
(WebGPU has no MoE kernel): each distinct expert in an `If` whose branch owns that expert's weights
(`switch`), so onnxruntime prepacks them like a dense MLP's and a decode step runs only its chosen
experts. onnxruntime-web reads no external data inside a branch, so the experts' weights stay in the graph
file; where that file would pass GRAPH_FILE_BYTES the graph routes by `gather` instead (ArgMax or TopK, then each
expert's MatMuls on the rows that chose it, its weights in the data files), which WebAssembly decodes
slower (`docs/runtimes/web.md`); q8 always routes by `gather` (LOWERINGS says why).

q8 is the int8 form transformers.js's own q8 models have (onnxruntime's dynamic quantization):
DynamicQuantizeMatMul, int8 weights with one scale per output channel, activations quantized to uint8 as
the kernel runs, one scale per block of at most 128 input channels (`onnx_quant.DynamicInt8Linears`);
onnxruntime-web's WebAssembly build runs it 3-4x faster than the 8-bit MatMulNBits of the onnx target's int8.
q4 is MatMulNBits, 4-bit blocks of 32, as the onnx target's int4. Both look the embedding up from the LM
head's (or embedding's) quantized bytes by Gather and arithmetic (the browser build of onnxruntime-web has
no GatherBlockQuantized kernel); fp16 stores fp16 weights that a Cast widens (activations and the KV cache
stay fp32).

The parity check runs the folder through transformers.js itself (`runtimes.transformersjs`, the script in
`web/`): teacher-forced logits step by step in onnxruntime-node and in onnxruntime-web's WebAssembly build
(both in Node), then `generate()`, greedy, as an app calls it, against the transformers reference's tokens.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from converters.base import Exporter, exact, lossy, register_target
from d2m_export.errors import ParityError, UserError
from d2m_export.sources.models import read_config

log = logging.getLogger(__name__)

ONNX_DIR = "onnx"
# --quant -> (transformers.js dtype suffix, the onnx builder's quant)
QUANTS = {"fp32": ("", "fp32"), "fp16": ("_fp16", "fp16"), "q8": ("_quantized", "int8_dynamic"), "q4": ("_q4", "int4")}
CHUNK_BYTES = 1 << 30              # external data per file: well under the 2 GB a browser's ArrayBuffer holds
WASM_MEMORY = 4 << 30              # WebAssembly (32-bit) addresses 4 GiB: the weights must fit beside activations
# model type -> what transformers.js knows it by (the graph is self-contained: only the KV cache naming and
# the position_ids start depend on it); the MoE types are in its registry since 4.0
FAMILIES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3_text",
            "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "mixtral": "mistral"}
POSITION_START = {"gemma3_text": 1}    # transformers.js counts these models' position_ids from 1
MIN_MAX_SEQ_LEN = 64
# MoE lowerings, in order of preference: `switch` while its graph file (the experts' weights in it) stays
# within GRAPH_FILE_BYTES (a browser holds the file in one buffer), else `gather`. q8 takes `gather` only: its
# kernel quantizes activations with one scale over the rows it is given, and a `switch` branch is given every
# row of a prompt, those routed elsewhere too (their outliers would coarsen the scale of the rows it serves)
LOWERINGS = {"fp32": ("switch", "gather"), "fp16": ("switch", "gather"), "q8": ("gather",), "q4": ("switch", "gather")}
GRAPH_FILE_BYTES = CHUNK_BYTES
PAGE_FILES = ("index.html", "page.js")


def model_file(quant: str) -> str:
    return f"{ONNX_DIR}/model{QUANTS[quant][0]}.onnx"


@register_target("web")
class WebExporter(Exporter):
    description = "transformers.js 4.x (browser: onnxruntime-web WASM/WebGPU; Node: onnxruntime-node), plain-ONNX MoE routing"
    quants = tuple(QUANTS)
    default_quant = "fp32"
    # the onnx target's gates (fp16, int8 for q8, int4 for q4; converters.parity); fp32 exact. q8's dynamic int8
    # holds int8's gate on SmolLM2: mean KL 0.02 (dense) to 0.038 (LF-UC@0.8 unhealed), decisive top-1 >= 0.99
    artifact_bytes_per_param = {"fp32": 4.0, "fp16": 2.0, "q8": 1.1, "q4": 0.6}
    tolerances = {"fp32": exact(1e-2), "fp16": lossy(0.9, 0.005), "q8": lossy(0.9, 0.06), "q4": lossy(0.55, 1.4)}
    options = ("max_seq_len",)
    other_runtimes = ("web-wasm",)

    def check_options(self, config: dict, options: dict) -> dict:
        from d2m_export.architectures import check_table_rope
        from runtimes.transformersjs import node_command

        model_type = config.get("model_type")
        if model_type not in FAMILIES:
            raise UserError(f"the web target exports {', '.join(FAMILIES)} models, not {model_type!r}")
        node_command()                  # the parity check runs transformers.js in Node: say so before exporting
        n = options.get("max_seq_len")
        check_table_rope(config, "web", n)
        if n is not None and n < MIN_MAX_SEQ_LEN:
            raise UserError(f"--max-seq-len must be at least {MIN_MAX_SEQ_LEN} (the parity check decodes ~60 "
                            f"positions), not {n}")
        return options

    def memory_need(self, model_dir: Path, quant: str) -> tuple[int, str]:
        """As every target's, after the limit that binds first on the web: the weights in WebAssembly's memory."""
        check_fits_wasm(read_config(model_dir), quant)
        return super().memory_need(model_dir, quant)

    def export(self, model_dir: Path, quant: str, out_tmp: Path, max_seq_len: int | None = None) -> list[str]:
        import onnx

        from converters.onnx import build_model
        from converters.onnx_ops import ExternalData

        out_tmp = Path(out_tmp)
        (out_tmp / ONNX_DIR).mkdir()
        graph = model_file(quant)
        for lowering in LOWERINGS[quant]:
            data = ExternalData(out_tmp / f"{graph}_data", chunk_bytes=CHUNK_BYTES)
            try:
                proto = build_model(model_dir, QUANTS[quant][1], max_seq_len, lowering, None, data,
                                    position_offset=POSITION_START.get(read_config(model_dir).get("model_type"), 0),
                                    logits_to_keep=True, plain_embedding=True, inline_branches=True)
            finally:
                data.close()
            if lowering == LOWERINGS[quant][-1] or graph_file_fits(proto):
                break
            log.info("web: the experts' weights would make %s larger than %d MiB: routing by gather instead",
                     graph, GRAPH_FILE_BYTES >> 20)
            for path in data.paths:
                path.unlink()
        onnx.save_model(proto, out_tmp / graph)            # the rest of its weights are in the data files already
        onnx.checker.check_model(str(out_tmp / graph))
        return [graph, *(f"{ONNX_DIR}/{p.name}" for p in data.paths), *write_page(out_tmp)]

    def adapt_config(self, out_tmp: Path) -> None:
        """config.json tells transformers.js which graph to load and how many data files it has."""
        out_tmp = Path(out_tmp)
        graph = next((out_tmp / ONNX_DIR).glob("model*.onnx"))
        quant = next(q for q, (suffix, _) in QUANTS.items() if graph.name == f"model{suffix}.onnx")
        chunks = len(list((out_tmp / ONNX_DIR).glob(f"{graph.name}_data*")))
        path = out_tmp / "config.json"
        config = json.loads(path.read_text())
        if FAMILIES[config["model_type"]] != config["model_type"]:
            config = {**config, "model_type": FAMILIES[config["model_type"]], "d2m_model_type": config["model_type"]}
        config["transformers.js_config"] = {"dtype": quant, "use_external_data_format": {graph.name: chunks}}
        path.write_text(json.dumps(config, indent=2) + "\n")

    def details(self, out_tmp: Path, files: list[str]) -> dict:
        from converters.onnx import graph_details

        info = graph_details(Path(out_tmp) / files[0], files[0])
        quant = next(q for q in QUANTS if files[0] == model_file(q))
        return {**info, "dtype": quant, "external_data": [f for f in files[1:] if f.startswith(f"{ONNX_DIR}/")],
                "page": "index.html (d2m-export serve DIR serves it)",
                "loads_with": "transformers.js 4.x: AutoModelForCausalLM.from_pretrained(folder, "
                              "{local_files_only: true}) (dtype and data files from config.json)"}

    def parity(self, model_dir: Path, export_dir: Path, quant: str, threads: int | None = None,
               new_tokens: int = 32) -> dict:
        """Teacher-forced logits in both runtimes (`converters.parity`), then the app's own path: the
        tokenizer and `generate()` of transformers.js, greedy, against the reference's prompts and tokens."""
        from converters.parity import PROMPTS, check_parity
        from transformers import AutoTokenizer

        from runtimes.transformersjs import TransformersJsRunner

        result = check_parity(self, model_dir, export_dir, quant, threads=threads, new_tokens=new_tokens,
                              runtimes=self.other_runtimes)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        runner = TransformersJsRunner(threads=threads or 1)
        runner.manifest = {"target": self.name}
        checks = []
        with runner.load(export_dir):
            for text, prompt in zip(PROMPTS, result["prompts"]):
                ids = tokenizer(text)["input_ids"]
                js_ids = runner.tokenize(text)
                if js_ids != ids:
                    raise ParityError(f"web: transformers.js tokenizes {text[:30]!r}... as {js_ids[:12]}..., "
                                      f"transformers as {ids[:12]}...")
                got = runner.transformers_generate(ids, len(prompt["reference_tokens"]))["tokens"]
                want = prompt["reference_tokens"]
                same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                checks.append({"tokens": got, "prefix_match": same, "total": len(want)})
        prefix, total = sum(c["prefix_match"] for c in checks), sum(c["total"] for c in checks)
        if quant == "fp32" and prefix != total:
            raise ParityError(f"web fp32: transformers.js generate() follows the reference's greedy tokens for only "
                              f"{prefix}/{total} of them")
        result["generate"] = {"runtime": "transformers.js generate(), greedy, onnxruntime-node",
                              "tokenizer_match": True, "prefix_match": prefix, "total": total,
                              "prompts": [{"prefix_match": c["prefix_match"],   # the tokens, where they part
                                           **({"tokens": c["tokens"]} if c["prefix_match"] < c["total"] else {})}
                                          for c in checks]}
        return result


def graph_file_fits(proto) -> bool:
    """Whether the graph file (the weights kept in it: the experts' under `switch`) stays within GRAPH_FILE_BYTES."""
    try:
        return proto.ByteSize() <= GRAPH_FILE_BYTES
    except (ValueError, OverflowError):     # protobuf refuses to size a message past 2 GB
        return False


def write_page(out_tmp: Path) -> list[str]:
    """index.html and its script, copied from web/page/ (the page loads the folder it is in)."""
    from runtimes.transformersjs import WEB_DIR

    for name in PAGE_FILES:
        shutil.copyfile(WEB_DIR / "page" / name, Path(out_tmp) / name)
    return list(PAGE_FILES)


def check_fits_wasm(config: dict, quant: str) -> None:
    """Refuse, before building anything, a model whose weights at `quant` cannot fit WebAssembly's memory."""
    from d2m_export.sources.params import param_counts

    try:
        params = param_counts(config).total
    except (TypeError, ValueError, ArithmeticError, AttributeError, KeyError):
        return                  # a config we cannot count: the export itself says what is wrong with it
    need = {q: params * b for q, b in WebExporter.artifact_bytes_per_param.items()}
    if need[quant] >= WASM_MEMORY:
        fits = [q for q, n in need.items() if n < WASM_MEMORY]
        raise UserError(f"the {quant} weights would take {need[quant] / 2**30:.1f} GiB; WebAssembly's memory is "
                        f"{WASM_MEMORY / 2**30:g} GiB (onnxruntime-web holds every weight in it)"
                        + (f": try --quant {fits[0]}" if fits else ": this model is too large for the web"))
