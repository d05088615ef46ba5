"""`genai_config.json`: what ONNX Runtime GenAI (`onnxruntime_genai.Model`, and its Kotlin, Swift and C
APIs) needs beside our decoder graph.

Our graph already has the interface ONNX Runtime GenAI's own model builder writes for a decoder:
`input_ids`, `attention_mask` (as long as the valid sequence), `position_ids`,
`past_key_values.N.key/value` -> `logits`, `present.N.key/value`, BNSH caches and
GroupQueryAttention. GroupQueryAttention writes new keys in place, so the past and present caches
can share one buffer (`past_present_share_buffer`), as in the builder's CPU models. What is left is
the configuration: the graph's own cache shapes (head size padded to GroupQueryAttention's
multiple, KV heads, one cache per *kept* layer: an LF-UC model has fewer layers than its source),
the token ids, and greedy search by default. RoPE is in the graph (GroupQueryAttention's cos/sin tables, from
transformers' own rotary module): ONNX Runtime GenAI recomputes nothing from the config, so llama3 and
the other table RoPE types run as exported. The tokenizer files are copied beside it by the
export, as ONNX Runtime GenAI reads them from the same folder.
"""
from __future__ import annotations

import json
from pathlib import Path

CONFIG_FILE = "genai_config.json"
# ONNX Runtime GenAI's model types whose decoder is the plain one (no vision or speech parts); our
# graph is the same for all of them, the type mainly picks defaults such as the chat template.
GENAI_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen2_moe": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3",
               "mixtral": "mistral"}


def _token_id(value, default=None):
    """A token id from config.json / generation_config.json, where eos may be a list."""
    if isinstance(value, list):
        return [int(v) for v in value] if value else default
    return int(value) if value is not None else default


def genai_config(config: dict, generation: dict, graph: str, details: dict) -> dict:
    """The genai_config.json for our graph `graph`, from the model's config.json / generation_config.json
    and the graph's own facts (`OnnxExporter.details`: cache layers, KV heads, head size, positions)."""
    heads = int(config["num_attention_heads"])
    eos = _token_id(generation.get("eos_token_id", config.get("eos_token_id")), 0)
    bos = _token_id(generation.get("bos_token_id", config.get("bos_token_id")), eos if isinstance(eos, int) else eos[0])
    pad = _token_id(generation.get("pad_token_id", config.get("pad_token_id")), eos if isinstance(eos, int) else eos[0])
    context = int(details["max_positions"])
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": graph,
                "head_size": int(details["kv_head_dim"]),
                "hidden_size": int(config["hidden_size"]),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": int(details["num_layers"]),
                "num_key_value_heads": int(details["kv_heads"]),
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": GENAI_TYPES.get(config.get("model_type"), "llama"),
            "vocab_size": int(config["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def write_genai_config(out_dir: Path, model_dir: Path, graph: str, details: dict) -> str:
    """Write genai_config.json into `out_dir`; return its file name."""
    def read(name: str) -> dict:
        path = Path(model_dir) / name
        return json.loads(path.read_text()) if path.is_file() else {}

    cfg = genai_config(read("config.json"), read("generation_config.json"), graph, details)
    (Path(out_dir) / CONFIG_FILE).write_text(json.dumps(cfg, indent=4) + "\n")
    return CONFIG_FILE
