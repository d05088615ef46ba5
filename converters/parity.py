"""The parity check every export passes before it is renamed into place.

Reference: the transformers model, computing in fp32. Two measurements, both in the export's real
runtime and both teacher-forced (the runtime is fed the reference's tokens, so every step compares
like for like and one divergence does not cascade):

- the prompts: each prompt's greedy continuation by the reference; `greedy_match` counts the steps at
  which the runtime's argmax equals the reference's token. Lossless exports must match every token
  (then the runtime's own greedy decoding reproduces the reference exactly), within a logit error
  near float rounding.
- a fixed text (`FIXED_TEXT`, a few hundred tokens of ordinary prose and code): at each position the
  top-1 agreement with the reference and KL(reference || export) of the next-token distributions, as
  llama.cpp's `perplexity --kl-divergence` reports them ("same top p", mean KLD, PPL(Q)/PPL(base)).
  These gate lossy exports: the mean KL, and the top-1 agreement at the positions where the reference
  is decisive (`DECISIVE_MARGIN`). A greedy continuation of a weak model is repetitive text whose top two
  logits are often nearly tied, so its agreement measures the model's fragility as much as the
  export; natural text and the KL do not depend on where the ties fall, and a broken export (an expert
  lost, scales wrong) moves them far beyond what quantization does.

The reference (transformers in fp32 on every prompt and window) is the check's costly half at 1B-3B. Inside
`shared_reference()` (one model exported to several targets in one run) it is computed once per model and
kept for the run: the prompts' greedy continuations per (prompts, new tokens), the fixed text's logits per
window size (the windows depend on the export's context: `window_size`). Every target of the run is checked
against the same figures; the parity record says `reference_shared: true` where it reused them.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from d2m_export.errors import ParityError

PROMPTS = (
    "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by the sea,",
    "Question: Why do leaves change colour in the autumn?\nAnswer:",
)

# Austen's opening (public domain), then plain exposition, instructions and code: 329 tokens for SmolLM2.
FIXED_TEXT = '''It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in \
want of a wife. However little known the feelings or views of such a man may be on his first entering a \
neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered the \
rightful property of some one or other of their daughters.

"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?"

Mr. Bennet replied that he had not.

Water covers about seventy per cent of the surface of the Earth, yet only a small part of it is fresh. Most fresh \
water is frozen in ice caps and glaciers, and much of the rest lies underground; rivers and lakes hold less than one \
per cent of it. When the sun warms the oceans, water evaporates, rises as vapour, cools and condenses into clouds, \
and falls again as rain or snow.

To bake a simple loaf of bread, mix 500 grams of flour with a teaspoon of salt and 7 grams of dried yeast. Add about \
300 millilitres of warm water and knead the dough for ten minutes, until it is smooth and elastic. Leave it to rise \
in a warm place for an hour, shape it, let it rise again, and bake it at 220 degrees for thirty minutes.

def mean(values):
    """The arithmetic mean of a non-empty list of numbers."""
    return sum(values) / len(values)
'''
TEXT_WINDOW = 512      # tokens per window at most (the whole text in one window when the export's context allows)
TEXT_PREFILL = 16      # each window starts with a prefill of this many tokens; the rest are decoded one by one
# A position is decisive when the reference's top token leads the runner-up by this many nats (is at least e times
# as likely). Top-1 agreement is gated there only, and only with enough such positions: elsewhere the reference
# itself is torn between tokens, and which one a sound export picks is a coin toss (a tiny random model has
# almost no decisive position; SmolLM2 has about 100 of the text's 313).
DECISIVE_MARGIN = 1.0
MIN_DECISIVE = 20


def reference_greedy(model, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits that chose them ([new_tokens, vocab]), from transformers."""
    import inspect

    import torch
    from transformers import DynamicCache

    # transformers 5.x renamed the cache argument (past_key_values -> cache): pass our own cache
    # object, updated in place, under whichever name this release takes
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache(config=model.config)
    step, tokens, logits = list(prompt_ids), [], []
    with torch.no_grad():
        for _ in range(new_tokens):
            row = model(input_ids=torch.tensor([step]), use_cache=True, logits_to_keep=1,
                        **{key: cache}).logits[0, -1].float()
            logits.append(row.numpy().copy())
            tokens.append(int(row.argmax()))
            step = [tokens[-1]]
    return tokens, np.stack(logits)


def runtime_forced(runner, prompt_ids: list[int], tokens: list[int]) -> np.ndarray:
    """The runtime's logits at each step when fed the reference's tokens."""
    rows = [runner.prefill(prompt_ids)]
    for token in tokens[:-1]:
        rows.append(runner.decode(token))
    return np.stack(rows)


# --- the fixed text ---------------------------------------------------------------------------------

def window_size(context: int) -> int:
    """The longest fixed-text window an export of `context` positions is checked on."""
    return max(TEXT_PREFILL + 1, min(TEXT_WINDOW, int(context)))


def text_windows(ids: list[int], context: int) -> list[list[int]]:
    """`ids` cut into windows of near-equal length that each fit `context` (and TEXT_WINDOW) tokens."""
    size = window_size(context)
    count = -(-len(ids) // size)
    bounds = np.linspace(0, len(ids), count + 1).round().astype(int)
    return [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def reference_text_logits(model, window: list[int]) -> np.ndarray:
    """The reference's logits predicting window[TEXT_PREFILL:], in one forward pass ([positions, vocab])."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([window[:-1]])).logits[0].float()
    return logits[TEXT_PREFILL - 1:].numpy().copy()


def runtime_text_rows(runner, window: list[int]):
    """The runtime's logits at the same positions: one prefill, then one decode step per token."""
    yield runner.prefill(window[:TEXT_PREFILL])
    for token in window[TEXT_PREFILL:-1]:
        yield runner.decode(token)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class TextScore:
    """Per-position agreement, KL(reference || export) and the two negative log-likelihoods, accumulated."""

    def __init__(self):
        self.top1, self.kl, self.nll_ref, self.nll_got, self.err, self.margin = [], [], [], [], [], []

    def add(self, ref: np.ndarray, got: np.ndarray, target: int) -> None:
        got = np.asarray(got, np.float32)
        self.err.append(float(np.abs(got - ref).max()))
        lp_ref, lp_got = _log_softmax(ref), _log_softmax(got)
        self.top1.append(int(ref.argmax()) == int(got.argmax()))
        runner_up, top = np.partition(ref, -2)[-2:]
        self.margin.append(float(top - runner_up))
        self.kl.append(float((np.exp(lp_ref) * (lp_ref - lp_got)).sum()))
        self.nll_ref.append(-float(lp_ref[target]))
        self.nll_got.append(-float(lp_got[target]))

    def result(self) -> dict:
        kl = np.array(self.kl)
        decisive = np.array(self.top1)[np.array(self.margin) >= DECISIVE_MARGIN]
        return {"positions": len(self.kl), "top1_agreement": round(float(np.mean(self.top1)), 4),
                "mean_kl": float(kl.mean()), "p99_kl": float(np.quantile(kl, 0.99)), "max_kl": float(kl.max()),
                "ppl_reference": float(np.exp(np.mean(self.nll_ref))),
                "ppl_export": float(np.exp(np.mean(self.nll_got))),
                "ppl_ratio": float(np.exp(np.mean(self.nll_got) - np.mean(self.nll_ref))),
                "decisive_positions": len(decisive),
                "decisive_top1_agreement": round(float(decisive.mean()), 4) if len(decisive) else None,
                "max_abs_logit_err": float(np.max(self.err))}           # NaN stays NaN: it fails every gate


def reference_text(model, tokenizer, context: int) -> list[tuple[list[int], np.ndarray]]:
    """The fixed text's windows for an export of `context` positions, each with the reference's logits."""
    windows = text_windows(tokenizer(FIXED_TEXT)["input_ids"], context)
    return [(w, reference_text_logits(model, w)) for w in windows]


def score_text(runner, references: list[tuple[list[int], np.ndarray]]) -> dict:
    """The fixed text scored in `runner` against the reference (`reference_text`)."""
    score = TextScore()
    for window, ref in references:
        for row, got, target in zip(ref, runtime_text_rows(runner, window), window[TEXT_PREFILL:]):
            score.add(row, got, target)
    return {**score.result(), "windows": [len(w) for w, _ in references], "prefill_tokens": TEXT_PREFILL}


def text_gate_failure(text: dict, tol) -> str | None:
    """Why the fixed text's figures fail `tol` (a converters.base.Tolerance), or None when they pass."""
    problems = []
    if tol.max_abs_logit_err is not None and not text["max_abs_logit_err"] <= tol.max_abs_logit_err:  # NaN too
        problems.append(f"max |logit error| {text['max_abs_logit_err']:.3g} (allowed {tol.max_abs_logit_err:g})")
    floor, agreement = tol.min_decisive_top1_agreement, text["decisive_top1_agreement"]
    if floor is not None and text["decisive_positions"] >= MIN_DECISIVE and not agreement >= floor:
        problems.append(f"top-1 agreement {agreement:.3f} where the reference is decisive ({text['decisive_positions']} "
                        f"positions; need {floor:g})")
    if tol.max_mean_kl is not None and not text["mean_kl"] <= tol.max_mean_kl:
        problems.append(f"mean KL {text['mean_kl']:.3g} nats (allowed {tol.max_mean_kl:g})")
    if not problems:
        return None
    return f"on the fixed text ({text['positions']} positions): " + ", ".join(problems)


# --- the reference, shared by the targets of one run ----------------------------------------------------

_SHARED: dict | None = None      # the run's references while `shared_reference()` is open


@contextmanager
def shared_reference():
    """Within it, each model's reference is computed once and reused by every parity check (nested: one)."""
    global _SHARED
    outer = _SHARED
    if outer is None:
        _SHARED = {}
    try:
        yield
    finally:
        _SHARED = outer


def _model_key(model_dir: Path) -> tuple:
    """A model folder and what its files are now (a folder rewritten in the run is another model)."""
    folder = Path(model_dir).resolve()
    return (str(folder), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir())
                               if f.is_file() and f.suffix in (".json", ".safetensors", ".bin")))


def reference(model_dir: Path, prompts: tuple[str, ...], new_tokens: int, context: int | None,
              loaded: tuple | None = None) -> tuple:
    """(config, encoded prompts, their greedy references, the fixed text's references for an export of
    `context` positions (None: room for the prompts' continuations), shared): from the run's cache where an
    earlier check computed them (`shared` is then True), else computed now from the model in fp32 (and
    kept, inside `shared_reference()`): `loaded` (model, tokenizer) where the caller holds it, else loaded."""
    from d2m_export.sources.lazy_weights import release_memory
    from d2m_export.sources.memory import fp32_copy_fits
    from d2m_export.sources.models import load_fp32_compute

    cache = _SHARED if _SHARED is not None else {}
    key = _model_key(model_dir)
    greedy_key = (key, "greedy", tuple(prompts), int(new_tokens))

    def text_key():
        n = context if context is not None else max(len(ids) for ids in cache[greedy_key][0]) + new_tokens + 8
        return (key, "text", window_size(n)), n

    shared = greedy_key in cache and text_key()[0] in cache
    if not shared:
        model, tokenizer = loaded or load_fp32_compute(model_dir, whole=fp32_copy_fits(model_dir))[:2]
        cache[(key, "config")] = model.config
        if greedy_key not in cache:
            encoded = [tokenizer(p)["input_ids"] for p in prompts]
            cache[greedy_key] = (encoded, [reference_greedy(model, ids, new_tokens) for ids in encoded])
        if (k := text_key())[0] not in cache:
            cache[k[0]] = reference_text(model, tokenizer, k[1])
        del model
        release_memory()          # the reference, before the runtime maps the export
    return (cache[(key, "config")], *cache[greedy_key], cache[text_key()[0]], shared)


# --- the check --------------------------------------------------------------------------------------

def _scores_in(runner_cls, export_dir: Path, threads: int, n_ctx: int, encoded, references, text_refs) -> tuple:
    """Each prompt's teacher-forced logits, the fixed text's score, and the settings of one runtime."""
    from runtimes.base import read_manifest

    runner = runner_cls(threads=threads, kv_type="f32", n_ctx=n_ctx)
    runner.manifest = read_manifest(export_dir)
    with runner.load(export_dir):
        logits = [runtime_forced(runner, ids, ref[0]) for ids, ref in zip(encoded, references)]
        return logits, score_text(runner, text_refs), runner.settings


def _compare(prompts, encoded, references, logits) -> tuple[list[dict], float, int, int]:
    per_prompt = [{"text": text, "prompt_tokens": len(ids),
                   "max_abs_logit_err": float(np.abs(got - ref_logits).max()),
                   "greedy_match": int((got.argmax(-1) == np.array(ref_tokens)).sum()),
                   "greedy_total": len(ref_tokens), "reference_tokens": ref_tokens}
                  for text, ids, (ref_tokens, ref_logits), got in zip(prompts, encoded, references, logits)]
    return (per_prompt, max(p["max_abs_logit_err"] for p in per_prompt), sum(p["greedy_match"] for p in per_prompt),
            sum(p["greedy_total"] for p in per_prompt))


def check_parity(exporter, model_dir: Path, export_dir: Path, quant: str, threads: int | None = None,
                 new_tokens: int = 32, prompts: tuple[str, ...] = PROMPTS, runtimes: tuple[str, ...] = ()) -> dict:
    """The export against transformers in the target's own runtime and in each of `runtimes` (other
    runtimes that run this target's files, e.g. onnxruntime-genai): every one must pass."""
    from converters.phases import phase
    from runtimes.base import read_manifest

    context = read_manifest(export_dir).get("context_length") or None
    with phase("parity_reference"):
        config, encoded, references, text_refs, shared = reference(model_dir, prompts, new_tokens,
                                                                   None if context is None else int(context))
    n_ctx = max(max(len(ids) for ids in encoded) + new_tokens + 8, max(len(w) for w, _ in text_refs))
    tol = exporter.tolerance(quant, config)
    with phase("runtime_check"):
        result = _check_runtimes(exporter, export_dir, quant, threads, n_ctx, prompts, encoded, references,
                                 text_refs, tol, runtimes)
    result["reference_shared"] = shared
    return result


def _check_runtimes(exporter, export_dir, quant, threads, n_ctx, prompts, encoded, references, text_refs, tol,
                    runtimes) -> dict:
    from runtimes.base import runner_class

    result = None
    for runtime in (None, *runtimes):
        # one thread by default: exact either way, and immune to oversubscribed cores, where waiting
        # threads can slow a tiny model's step a hundredfold
        logits, text, settings = _scores_in(runner_class(exporter.name, runtime), export_dir, threads or 1, n_ctx,
                                            encoded, references, text_refs)
        per_prompt, err, match, total = _compare(prompts, encoded, references, logits)
        name = runtime or exporter.name
        greedy = f"{match}/{total} greedy tokens match the transformers reference"
        if tol.min_greedy_fraction is not None and not (err <= tol.max_abs_logit_err
                                                         and match >= tol.min_greedy_fraction * total):  # NaN too
            raise ParityError(f"{exporter.name} {quant} in {name}: {greedy} (need "
                              f"{int(np.ceil(tol.min_greedy_fraction * total))}), max |logit error| {err:.3g} "
                              f"(allowed {tol.max_abs_logit_err:g})")
        if (why := text_gate_failure(text, tol)) is not None:
            raise ParityError(f"{exporter.name} {quant} in {name}: {why}; {greedy}")
        if result is None:
            result = {"max_abs_logit_err": err, "greedy_match": match, "greedy_total": total,
                      "reference": "transformers fp32, greedy", "runtime_settings": settings,
                      "tolerance": tol.as_dict(), "text": text, "prompts": per_prompt}
        else:
            result.setdefault("other_runtimes", {})[name] = {
                "max_abs_logit_err": err, "greedy_match": match, "greedy_total": total, "text": text,
                "runtime_settings": settings}
    return result
