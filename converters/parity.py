"""The parity check every export passes before it is renamed into place.

Reference: the transformers model (fp32) decoding each prompt greedily. The export runs in its
real runtime under teacher forcing: it is fed the reference's own tokens, so each step's logits
compare like for like and one divergence does not cascade. `greedy_match` counts the steps at
which the runtime's argmax equals the reference's greedy token; when every step matches, the
runtime's own greedy decoding reproduces the reference's tokens exactly.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from d2m_export.errors import ParityError

PROMPTS = (
    "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by the sea,",
    "Question: Why do leaves change colour in the autumn?\nAnswer:",
)


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


def _forced_in(runner_cls, export_dir: Path, threads: int, n_ctx: int, encoded, references) -> tuple[list, dict]:
    """Each prompt's teacher-forced logits in one runtime, and the settings it ran with."""
    from runtimes.base import read_manifest

    runner = runner_cls(threads=threads, kv_type="f32", n_ctx=n_ctx)
    runner.manifest = read_manifest(export_dir)
    with runner.load(export_dir):
        return [runtime_forced(runner, ids, ref[0]) for ids, ref in zip(encoded, references)], runner.settings


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
    from d2m_export.lazy_weights import release_memory
    from d2m_export.models import load_fp32_compute
    from runtimes.base import runner_class

    model, tokenizer, _ = load_fp32_compute(model_dir)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    n_ctx = max(len(ids) for ids in encoded) + new_tokens + 8
    references = [reference_greedy(model, ids, new_tokens) for ids in encoded]
    max_err, min_frac = exporter.tolerance(quant, model.config)
    del model
    release_memory()          # the reference, before the runtime maps the export
    result = None
    for runtime in (None, *runtimes):
        # one thread by default: exact either way, and immune to oversubscribed cores, where waiting
        # threads can slow a tiny model's step a hundredfold
        logits, settings = _forced_in(runner_class(exporter.name, runtime), export_dir, threads or 1, n_ctx,
                                      encoded, references)
        per_prompt, err, match, total = _compare(prompts, encoded, references, logits)
        name = runtime or exporter.name
        if not (err <= max_err and match >= min_frac * total):   # also catches NaN
            raise ParityError(f"{exporter.name} {quant} in {name}: {match}/{total} greedy tokens match the transformers "
                              f"reference (need {int(np.ceil(min_frac * total))}), max |logit error| {err:.3g} "
                              f"(allowed {max_err:g})")
        if result is None:
            result = {"max_abs_logit_err": err, "greedy_match": match, "greedy_total": total,
                      "reference": "transformers fp32, greedy", "runtime_settings": settings,
                      "tolerance": {"max_abs_logit_err": max_err, "min_greedy_fraction": min_frac},
                      "prompts": per_prompt}
        else:
            result.setdefault("other_runtimes", {})[name] = {
                "max_abs_logit_err": err, "greedy_match": match, "greedy_total": total, "runtime_settings": settings}
    return result
