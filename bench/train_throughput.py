"""Training throughput: our `train` loop vs a plain Hugging Face `Trainer`, side by side.

Same model (the embedded SmolLM2), same micro-batch, accumulation, sequence length and data,
fp32 on CPU. Each side runs --steps optimizer steps, alternating, --rounds times; the figure is
the median step time after the first two steps of each run. Rerun: python bench/train_throughput.py
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HF_SCRIPT = r'''
import json, sys, time, torch
from transformers import Trainer, TrainingArguments, TrainerCallback
from d2m_export.models import load_model
from d2m_export.data import pack, DEFAULT_TRAIN_CORPORA
steps, micro, accum, seq, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.manual_seed(0)
model, tok, _ = load_model("smollm2-135m")
model.train()
chunks = pack(tok, list(DEFAULT_TRAIN_CORPORA), seq)
data = [{"input_ids": c, "labels": c} for c in chunks[: steps * micro * accum]]
times = []
class Clock(TrainerCallback):
    def on_step_begin(self, *a, **k): self.t = time.time()
    def on_step_end(self, *a, **k): times.append(time.time() - self.t)
args = TrainingArguments(output_dir=out, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
                         max_steps=steps, learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=1,
                         max_grad_norm=1.0, logging_steps=1000, save_strategy="no", report_to=[],
                         dataloader_num_workers=0, use_cpu=True, disable_tqdm=True)
Trainer(model=model, args=args, train_dataset=data, callbacks=[Clock()]).train()
print(json.dumps(times))
'''


def ours(steps, micro, accum, seq, work: Path) -> list[float]:
    out = work / f"ours-{time.time_ns()}"
    cmd = [sys.executable, "-m", "d2m_export.cli", "train", "--model", "smollm2-135m", "--out", str(out),
           "--tokens", str(steps * micro * accum * seq), "--seq-len", str(seq), "--micro-batch", str(micro),
           "--global-batch", str(micro * accum), "--save-every", "1000000", "--balance-loss-weight", "0"]
    subprocess.run(cmd, check=True, capture_output=True)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [micro * accum * seq / r["tokens_per_s"] for r in rows]


def hf(steps, micro, accum, seq, work: Path) -> list[float]:
    res = subprocess.run([sys.executable, "-c", HF_SCRIPT, str(steps), str(micro), str(accum), str(seq),
                          str(work / "hf")], check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_train_throughput"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_throughput.md")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    tokens = a.micro_batch * a.accum * a.seq_len
    step_times = {"d2m-export train": [], "transformers Trainer": []}
    for _ in range(a.rounds):
        step_times["d2m-export train"] += ours(a.steps, a.micro_batch, a.accum, a.seq_len, a.work)[2:]
        step_times["transformers Trainer"] += hf(a.steps, a.micro_batch, a.accum, a.seq_len, a.work)[2:]
    tps = {k: tokens / statistics.median(v) for k, v in step_times.items()}
    ratio = tps["d2m-export train"] / tps["transformers Trainer"]
    lines = ["# Training throughput, SmolLM2-135M, fp32, CPU", "",
             f"micro-batch {a.micro_batch} × accumulation {a.accum} × seq {a.seq_len} = {tokens} tokens/step; "
             f"{a.rounds} alternating rounds of {a.steps} steps; median step time after 2 warm-up steps.", "",
             "| loop | tokens/s |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in tps.items()]
    lines += ["", f"ours ÷ Trainer = {ratio:.3f}", ""]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
