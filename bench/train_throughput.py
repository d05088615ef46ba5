"""Training throughput: our `train` loop vs a plain Hugging Face `Trainer`, side by side.

Same model (the embedded SmolLM2), same global batch, micro-batch, sequence length and data,
fp32 on CPU. Each side runs --steps optimizer steps, alternating, --rounds times; the figure is
the median step time after the first two steps of each run.

With --processes N (> 1): ours under torchrun as DDP and as --fsdp, and the Trainer under
`accelerate launch --use_fsdp --fsdp_version 2`; the table says how accelerate actually wrapped
the model (on the CPU it falls back to DDP: it has no CPU FSDP).
Rerun: python bench/train_throughput.py [--processes 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import os
from pathlib import Path

HF_SCRIPT = r'''
import json, sys, time, torch
from transformers import Trainer, TrainingArguments, TrainerCallback
from d2m_export.sources.models import load_model
from d2m_export.sources.data import pack, DEFAULT_TRAIN_CORPORA
steps, micro, accum, seq, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
fsdp = len(sys.argv) > 6
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
                         dataloader_num_workers=0, use_cpu=True, disable_tqdm=True,
                         **({"fsdp": True, "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True,
                             "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}} if fsdp else {}))
trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Clock()])
trainer.train()
if trainer.args.process_index == 0:
    print(json.dumps({"times": times, "wrapper": type(trainer.model_wrapped).__name__}))
'''

def env(processes: int) -> dict:
    """Several processes share the 2 cores: one thread each."""
    return {**os.environ, "OMP_NUM_THREADS": "1"} if processes > 1 else dict(os.environ)


def ours(steps, micro, accum, seq, work: Path, processes: int = 1, fsdp: bool = False) -> list[float]:
    out = work / f"ours-{time.time_ns()}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                "--master-port", "29650"] if processes > 1 else [sys.executable]
    cmd = [*launcher, "-m", "d2m_export.cli", "train", "--model", "smollm2-135m", "--out", str(out),
           "--tokens", str(steps * micro * accum * seq), "--seq-len", str(seq), "--micro-batch", str(micro),
           "--global-batch", str(micro * accum), "--save-every", "1000000", "--balance-loss-weight", "0",
           "--dtype", "fp32", *(["--fsdp"] if fsdp else [])]
    subprocess.run(cmd, check=True, capture_output=True, env=env(processes))
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [micro * accum * seq / r["tokens_per_s"] for r in rows]


def hf(steps, micro, accum, seq, work: Path, processes: int = 1) -> tuple[list[float], str]:
    """(step times, the wrapper the Trainer put around the model)."""
    args = [str(steps), str(micro), str(accum // processes), str(seq), str(work / "hf")]
    if processes > 1:
        script = work / "hf_trainer.py"
        script.write_text(HF_SCRIPT)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--main_process_port", "29651", "--use_fsdp", "--fsdp_version", "2", str(script), *args, "fsdp"]
    else:
        cmd = [sys.executable, "-c", HF_SCRIPT, *args]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env(processes))
    result = json.loads(res.stdout.strip().splitlines()[-1])
    return result["times"], result["wrapper"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_train_throughput"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_throughput.md")
    ap.add_argument("--processes", type=int, default=1, help="processes (> 1: DDP and FSDP side by side)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.accum % a.processes:
        raise SystemExit("--accum must be a multiple of --processes")
    tokens = a.micro_batch * a.accum * a.seq_len
    n = a.processes
    runs = {"d2m-export train" + (" (DDP)" if n > 1 else ""): lambda: ours(a.steps, a.micro_batch, a.accum,
                                                                          a.seq_len, a.work, n)}
    if n > 1:
        runs["d2m-export train --fsdp"] = lambda: ours(a.steps, a.micro_batch, a.accum, a.seq_len, a.work, n, True)
    wrappers = {}

    def trainer():
        times, wrappers["trainer"] = hf(a.steps, a.micro_batch, a.accum, a.seq_len, a.work, n)
        return times
    runs["transformers Trainer" + (" (accelerate, FSDP requested)" if n > 1 else "")] = trainer
    step_times = {k: [] for k in runs}
    for _ in range(a.rounds):
        for name, fn in runs.items():
            step_times[name] += fn()[2:]
    tps = {k: tokens / statistics.median(v) for k, v in step_times.items()}
    trainer_name = list(runs)[-1]
    lines = [f"# Training throughput, SmolLM2-135M, fp32, CPU, {n} process{'es' if n > 1 else ''}", "",
             f"global batch: micro-batch {a.micro_batch} × {a.accum} × seq {a.seq_len} = {tokens} tokens/step"
             + (f" over {n} processes" if n > 1 else "") + f"; {a.rounds} alternating rounds of {a.steps} steps; "
             "median step time after 2 warm-up steps.", "", "| loop | tokens/s | ÷ Trainer |", "|---|---|---|"]
    lines += [f"| {k} | {v:.0f} | {v / tps[trainer_name]:.3f} |" for k, v in tps.items()]
    if n > 1:
        lines += ["", f"accelerate wrapped the Trainer's model in `{wrappers['trainer']}`"
                  + (": on the CPU accelerate runs the FSDP request as DDP (it has no CPU FSDP), so the "
                     "like-for-like ratio is ours (DDP) ÷ Trainer; ours --fsdp is real FSDP2 over gloo."
                     if "FSDP" not in wrappers["trainer"] else ".")]
    lines.append("")
    out = a.out if n == 1 else a.out.with_name(f"{a.out.stem}_{n}proc.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
