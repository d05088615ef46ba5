"""Decode speed of an ONNX decoder through optimum's ORTModelForCausalLM (run in a venv that has optimum-onnx).

Used by bench/onnx_smollm2.py: optimum-onnx pins an older transformers than ours, so it lives in its
own virtual environment and this script prints one JSON line. `--load-only` just reports whether
ORTModelForCausalLM loads the directory (and, if it does, the greedy tokens it generates).
"""
import argparse
import json
import statistics
import time

import onnxruntime as ort
import torch
from optimum.onnxruntime import ORTModelForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--load-only", action="store_true")
    args = ap.parse_args()
    ids = torch.tensor([[int(t) for t in args.prompt_ids.split(",")]])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
    try:
        model = ORTModelForCausalLM.from_pretrained(args.model_dir, session_options=so, use_cache=True,
                                                    use_io_binding=False)
    except Exception as e:        # report why, as data: the caller records it
        print(json.dumps({"loads": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}))
        return
    if args.load_only:
        try:
            out = model.generate(ids, max_new_tokens=16, do_sample=False)
            print(json.dumps({"loads": True, "tokens": out[0, ids.shape[1]:].tolist()}))
        except Exception as e:
            print(json.dumps({"loads": True, "runs": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}))
        return
    decode_s, step_ms = [], []
    for run in range(args.repeats + 1):               # run 0 warms up
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
            past, token, length, steps = out.past_key_values, int(out.logits[0, -1].argmax()), ids.shape[1], []
            for _ in range(args.new_tokens):
                t0 = time.perf_counter()
                length += 1
                out = model(input_ids=torch.tensor([[token]]), attention_mask=torch.ones(1, length, dtype=torch.long),
                            past_key_values=past, use_cache=True)
                past, token = out.past_key_values, int(out.logits[0, -1].argmax())
                steps.append(time.perf_counter() - t0)
        if run:
            decode_s.append(sum(steps))
            step_ms.append(statistics.median(steps) * 1e3)
    print(json.dumps({"loads": True, "decode_tokens_per_s": round(args.new_tokens / statistics.median(decode_s), 2),
                      "decode_ms_per_token_p50": round(statistics.median(step_ms), 3), "threads": args.threads}))


if __name__ == "__main__":
    main()
