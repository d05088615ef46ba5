"""Does the roofline predict measured decode time on this host? Dense and LF-UC SmolLM2, every runtime here.

1. `d2m-export profile --calibrate <dense exports> --long-prompt-tokens 960 --out
   device_profiles/host.yaml`: bandwidth and matmul probes, and per runtime two efficiencies
   (roofline ÷ measured), of the weight reads and of the KV-cache reads, solved from the dense
   model's decode time at prompts 64 and 960 (64 new tokens).
2. Predict, with them, the decode time of cases the calibration did not see — the dense model at
   a middle context (prompt 480) and the LF-UC model (--ratio, 11 fewer attention layers, so a
   different weight/KV mix) at all three — and measure them, side by side in rounds
   (bench/sidebyside.py). The residual is reported per case; the target is within 25%.

Rerun:  python bench/roofline_host.py      (writes bench/results/roofline_host.md and .json)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sidebyside import CLI, ROOT, bench_export, convert, export, median, publish, rounds, sh  # noqa: E402

from d2m_export.sources.models import DEFAULT_MODEL  # noqa: E402
from d2m_export.devices.probe import predicted_decode_ms  # noqa: E402

RUNTIMES = {"onnx fp32": ("onnx", "fp32"), "gguf f32": ("gguf", "f32"), "gguf q8_0": ("gguf", "q8_0"),
            "executorch fp32": ("executorch", "fp32")}
CONTEXTS = {"short": 64, "mid": 480, "long": 960}   # prompt tokens; 64 new tokens are decoded after them
CALIBRATION = ("short", "long")                      # the dense model's points the efficiencies come from


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    ap.add_argument("--work", type=Path, default=Path("runs/bench_roofline"))
    ap.add_argument("--profile-out", type=Path, default=ROOT / "device_profiles" / "host.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "roofline_host.md")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    lfuc = convert("lfuc", args.ratio, work / f"lfuc-{args.ratio}")
    max_seq = ("--max-seq-len", 1280)
    exports = {}
    for name in args.runtimes:
        target, quant = RUNTIMES[name]
        extra = ("--quant", quant, *(max_seq if target in ("executorch", "onnx") else ()))
        for model, label in ((DEFAULT_MODEL, "dense"), (lfuc, "lfuc")):
            out = work / f"{label}-{target}-{quant}"
            export(model, target, out, *extra)
            exports[f"{label} {name}"] = out

    sh([*CLI, "profile", "--threads", args.threads, "--out", args.profile_out,
        "--long-prompt-tokens", CONTEXTS[CALIBRATION[1]],
        "--calibrate", *[exports[f"dense {n}"] for n in args.runtimes]])
    profile = yaml.safe_load(args.profile_out.read_text())

    cases = {}
    for name in args.runtimes:
        for label in ("dense", "lfuc"):
            for ctx, prompt in CONTEXTS.items():
                if label == "dense" and ctx in CALIBRATION:
                    continue                                   # calibration points
                cases[f"{label} {name} {ctx}"] = (exports[f"{label} {name}"], prompt)

    def bench_case(out, prompt):
        return lambda r: bench_export(out, work / "bench" / f"{out.name}-{prompt}-{r}.json", prompt, args.new_tokens,
                                      args.threads)

    rows = rounds({k: bench_case(*v) for k, v in cases.items()}, args.rounds)
    results = {}
    for case, (out, prompt) in cases.items():
        key = "{}:{}".format(*RUNTIMES[" ".join(case.split()[1:3])])
        eff = profile["runtime_efficiency"][key]
        kv_eff = profile.get("runtime_kv_efficiency", {}).get(key)
        predicted = predicted_decode_ms(out, profile, prompt + args.new_tokens // 2, eff, kv_eff)
        measured = 1e3 / median(rows, case)
        results[case] = {"efficiency": eff, "kv_efficiency": kv_eff, "predicted_ms": round(predicted, 2),
                         "measured_ms": round(measured, 2), "error": round(predicted / measured - 1, 3)}
    summary = {"profile": {k: profile.get(k, {}) for k in ("name", "memory_bandwidth_gbs", "compute_gflops",
                                                          "runtime_efficiency", "runtime_kv_efficiency")},
               "ratio": args.ratio, "new_tokens": args.new_tokens, "contexts": CONTEXTS, "rounds": args.rounds,
               "cases": results, "max_abs_error": max(abs(r["error"]) for r in results.values()),
               "wall_s": round(time.time() - t_start, 1)}
    publish(args.out, summary, render)


def render(s: dict) -> str:
    p = s["profile"]
    lines = [f"# Roofline vs measured decode time on this host ({p['name']})", "",
             f"Probes: {p['memory_bandwidth_gbs']} GB/s read bandwidth, {p['compute_gflops']['fp32']} GFLOPS fp32 matmul. "
             "Runtime efficiency (roofline ÷ measured) of the weight reads / the KV-cache reads, solved from dense "
             f"SmolLM2 at prompts {s['contexts']['short']} and {s['contexts']['long']}: "
             + ", ".join(f"{k} {v:.0%} / {p['runtime_kv_efficiency'].get(k, v):.0%}"
                         for k, v in p["runtime_efficiency"].items()) + ".", "",
             f"Predictions for cases the calibration did not see (prompt "
             + ", ".join(f"{k} {v}" for k, v in s["contexts"].items()) + f" tokens, then {s['new_tokens']} decoded; "
             f"LF-UC at ratio {s['ratio']}); medians of {s['rounds']} side-by-side rounds:", "",
             "| case | efficiency (weights / KV) | predicted ms/token | measured ms/token | error |", "|---|---|---|---|---|"]
    for case, r in s["cases"].items():
        kv = r["kv_efficiency"] if r["kv_efficiency"] is not None else r["efficiency"]
        lines.append(f"| {case} | {r['efficiency']:.0%} / {kv:.0%} | {r['predicted_ms']} | {r['measured_ms']} | "
                     f"{r['error']:+.1%} |")
    lines += ["", f"Largest error: {s['max_abs_error']:.1%}. Wall time {s['wall_s']:.0f} s. "
              "Rerun: `python bench/roofline_host.py`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
