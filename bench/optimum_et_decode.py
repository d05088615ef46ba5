"""Decode speed of a .pte through optimum-executorch's ExecuTorchModelForCausalLM (in a venv with optimum-executorch).

Used by bench/executorch_smollm2.py: optimum-executorch pins its own transformers, so it lives in its
own virtual environment and this script prints one JSON line. `--load-only` reports whether
ExecuTorchModelForCausalLM loads the directory and the greedy tokens its `generate` produces.
"""
import argparse
import json
import statistics
import time

import torch
from optimum.executorch import ExecuTorchModelForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--load-only", action="store_true")
    args = ap.parse_args()
    from executorch.extension.pybindings import portable_lib
    portable_lib._unsafe_reset_threadpool(args.threads)
    ids = [int(t) for t in args.prompt_ids.split(",")]
    try:
        model = ExecuTorchModelForCausalLM.from_pretrained(args.model_dir)
    except Exception as e:        # reported as data: the caller records it
        print(json.dumps({"loads": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}))
        return
    if args.load_only:
        try:
            out = model.generate(prompt_tokens=ids, max_seq_len=len(ids) + 16)     # the new tokens only
            print(json.dumps({"loads": True, "tokens": [int(t) for t in out]}))
        except Exception as e:
            print(json.dumps({"loads": True, "runs": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}))
        return
    decode_s, step_ms, prefill_s = [], [], []
    for run in range(args.repeats + 1):               # run 0 warms up
        t0 = time.perf_counter()
        logits = model.forward(torch.tensor([ids], dtype=torch.long), torch.arange(len(ids), dtype=torch.long))
        t1 = time.perf_counter()
        pos, steps = len(ids), []
        for _ in range(args.new_tokens):
            token = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
            s0 = time.perf_counter()
            logits = model.forward(torch.tensor([[token]], dtype=torch.long), torch.tensor([pos], dtype=torch.long))
            steps.append(time.perf_counter() - s0)
            pos += 1
        if run:
            prefill_s.append(t1 - t0)
            decode_s.append(sum(steps))
            step_ms.append(statistics.median(steps) * 1e3)
    print(json.dumps({"loads": True, "decode_tokens_per_s": round(args.new_tokens / statistics.median(decode_s), 2),
                      "decode_ms_per_token_p50": round(statistics.median(step_ms), 3),
                      "prefill_tokens_per_s": round(len(ids) / statistics.median(prefill_s), 2), "threads": args.threads}))


if __name__ == "__main__":
    main()
