"""Tokenizer metadata for GGUF, written the way llama.cpp's converter writes a BPE (gpt2-style) vocab.

- `tokenizer.ggml.model = "gpt2"`; `tokens` in id order (ids the tokenizer lacks become
  `[PAD<id>]`, type UNUSED); added tokens are CONTROL when special (or `<|...|>`-shaped), else
  USER_DEFINED; everything else NORMAL;
- merges, bos/eos/unk/padding ids and the chat template via `gguf.SpecialVocab`;
- `add_bos_token` as the tokenizer actually behaves (does encoding prepend BOS?);
- `tokenizer.ggml.pre`, the pre-tokenizer llama.cpp must emulate, read from the structure of
  tokenizer.json's `pre_tokenizer`. A model derived from an embedded GGUF model takes it from
  that GGUF instead: transformers' GGUF loader rebuilds a plain GPT-2 byte-level pre-tokenizer,
  dropping e.g. SmolLM2's digit splitting, which the original ("smollm") has.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import gguf

from d2m_export.errors import UserError

log = logging.getLogger(__name__)

# Split regexes of well-known BPE pre-tokenizers (as they appear in tokenizer.json files).
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_PATTERNS = {
    _CONTRACTIONS + r"\p{N}" + _TAIL: "qwen2",
    _CONTRACTIONS + r"\p{N}{1,3}" + _TAIL: "llama-bpe",
}


def _pre_from_structure(pre: dict | None) -> str | None:
    if not pre:
        return None
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return SPLIT_PATTERNS.get(steps[0].get("pattern", {}).get("Regex"))
    return None


def embedded_origin(model_dir: Path) -> Path | None:
    """The GGUF file a model folder comes from: an embedded model's, a `--model x.gguf` conversion's, or
    that of the model a converted folder was made from (its d2m_plan.json's base_model)."""
    from d2m_export.sources.models import EMBEDDED, ORIGIN, embedded_gguf, read_record
    from d2m_export.paths import cache_dir

    model_dir = Path(model_dir)
    names = [n for n in EMBEDDED if model_dir.resolve() == (cache_dir() / "models" / n).resolve()]
    if not names and (model_dir / ORIGIN).is_file():
        try:
            path = Path(json.loads((model_dir / ORIGIN).read_text())["gguf"])
        except (ValueError, KeyError, TypeError):
            return None
        return path if path.is_file() else None
    if not names:
        base = (read_record(model_dir) or {}).get("base_model")
        if base in EMBEDDED:
            names = [base]
        elif base and str(base).endswith(".gguf") and Path(base).is_file():
            return Path(base)
    if not names:
        return None
    try:
        return embedded_gguf(names[0])
    except UserError:
        return None


@functools.lru_cache(maxsize=4)
def _tokenizer_fields(path: Path) -> dict:
    """The scalar tokenizer settings of a GGUF file (parsing one is slow: its vocabulary is large)."""
    fields = gguf.GGUFReader(path).fields
    keys = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_space_prefix")
    return {k: fields[k].contents() for k in keys if k in fields}


def pre_tokenizer(model_dir: Path, tokenizer_json: dict) -> str:
    origin = embedded_origin(model_dir)
    if origin is not None and (pre := _tokenizer_fields(origin).get("tokenizer.ggml.pre")):
        return pre
    pre = _pre_from_structure(tokenizer_json.get("pre_tokenizer"))
    if pre is None:
        log.warning("unrecognised BPE pre-tokenizer in %s/tokenizer.json; llama.cpp will use its default, "
                    "which may split text differently", model_dir)
        return "default"
    return pre


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def vocab_tokens(tokenizer_json: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"the gguf target reads BPE (gpt2-style) tokenizers, and SentencePiece ones from the GGUF "
                        f"file a model came from (--model x.gguf, embedded models); this one is {model.get('type')!r}")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {t["id"]: t for t in tokenizer_json.get("added_tokens", [])}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id) >= n_vocab:
        raise UserError(f"the tokenizer has token id {max(by_id)} but the model's vocabulary is {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            special = added[i].get("special") or _looks_special(by_id[i])
            tokens.append(by_id[i] if special else by_id[i].replace("\u2581", " "))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def adds_bos(model_dir: Path, bos_id: int | None) -> bool:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")).encode("Hello").ids
    return bos_id is not None and bool(ids) and ids[0] == bos_id


def copy_vocab(writer: gguf.GGUFWriter, origin: Path, n_vocab: int) -> str:
    """Every `tokenizer.*` field of the GGUF the model came from, as it is there; returns its pre-tokenizer."""
    fields = {k: f for k, f in gguf.GGUFReader(origin).fields.items() if k.startswith("tokenizer.")}
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != n_vocab:
        raise UserError(f"{origin.name} has {len(tokens.data) if tokens else 0} tokens but the model's vocabulary "
                        f"is {n_vocab}")
    for key, field in fields.items():
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    pre = fields.get("tokenizer.ggml.pre")
    return str(pre.contents()) if pre is not None else "default"


def add_vocab(writer: gguf.GGUFWriter, model_dir: Path, n_vocab: int) -> str:
    """Write the tokenizer metadata; return the pre-tokenizer name used. A SentencePiece vocabulary
    (Gemma's) is taken from the GGUF file the model came from."""
    origin = embedded_origin(model_dir)
    if origin is not None and _tokenizer_fields(origin).get("tokenizer.ggml.model", "gpt2") != "gpt2":
        return copy_vocab(writer, origin, n_vocab)
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{model_dir} has no tokenizer.json; the gguf target needs the model's fast tokenizer")
    tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    tokens, types = vocab_tokens(tokenizer_json, n_vocab)
    pre = pre_tokenizer(model_dir, tokenizer_json)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    special.add_special_token["bos"] = adds_bos(model_dir, special.special_token_ids.get("bos"))
    config = json.loads((Path(model_dir) / "tokenizer_config.json").read_text()) \
        if (Path(model_dir) / "tokenizer_config.json").is_file() else {}
    if isinstance(config.get("add_prefix_space"), bool):
        writer.add_add_space_prefix(config["add_prefix_space"])
    elif (origin := embedded_origin(model_dir)) is not None:
        if (value := _tokenizer_fields(origin).get("tokenizer.ggml.add_space_prefix")) is not None:
            writer.add_add_space_prefix(bool(value))
    special.add_to_gguf(writer, quiet=True)
    return pre
