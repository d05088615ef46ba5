"""Shared by the export benchmarks: run the CLI, reuse finished steps, time variants side by side, publish the tables.

Each round benchmarks every variant once, in turn, each in its own process (so peak RSS is its
own); a ratio is taken within a round and the median over rounds reported — on a shared, noisy
machine ratios measured side by side hold where absolute times do not.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

from d2m_export.outputs import write_json

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "d2m_export.cli"]


def sh(cmd: list, **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def done(path: Path, marker: str) -> bool:
    return (Path(path) / marker).is_file()


def convert(method: str, ratio: float, out: Path, *extra) -> Path:
    if not done(out, "d2m_plan.json"):
        sh([*CLI, "convert", "--method", method, "--target-active-ratio", ratio, "--out", out, *extra])
    return out


def export(model, target: str, out: Path, *extra) -> dict:
    """`d2m-export --target ...` unless `out` already holds a finished export; its manifest."""
    if not done(out, "manifest.json"):
        sh([*CLI, "--target", target, "--model", model, "--threads", 2, "--out", out, *extra])
    return json.loads((Path(out) / "manifest.json").read_text())


def bench_export(export_dir: Path, out: Path, prompt_tokens: int, new_tokens: int, threads: int,
                 runtime: str | None = None) -> dict:
    """One `d2m-export bench` run (one warm-up, one timed repeat) in its own process."""
    sh([*CLI, "bench", export_dir, "--prompt-tokens", prompt_tokens, "--new-tokens", new_tokens,
        "--threads", threads, "--repeats", 1, "--out", out, *(["--runtime", runtime] if runtime else [])],
       stdout=subprocess.DEVNULL)
    return json.loads(Path(out).read_text())


def rounds(variants: dict[str, Callable[[int], dict]], n: int) -> list[dict]:
    """Run every variant's bench function once per round, in turn; the list of rounds."""
    out = []
    for r in range(n):
        row = {name: fn(r) for name, fn in variants.items()}
        out.append(row)
        print(f"round {r + 1}/{n}: " + ", ".join(f"{k} {v['decode_tokens_per_s']:.1f}" for k, v in row.items()),
              flush=True)
    return out


def median(rows: list[dict], name: str, key: str = "decode_tokens_per_s") -> float:
    return round(statistics.median(row[name][key] for row in rows), 2)


def ratio(rows: list[dict], a: str, b: str, key: str = "decode_tokens_per_s") -> float:
    """Median over rounds of a ÷ b measured in the same round."""
    return round(statistics.median(row[a][key] / row[b][key] for row in rows), 3)


def make_venv(venv: Path, *pins: str) -> Path:
    """A side venv (tools that pin another transformers) with torch 2.13.0 and `pins`; made once."""
    if not (Path(venv) / ".ready").is_file():
        py = Path(venv) / "bin" / "python"
        sh([sys.executable, "-m", "venv", venv])
        sh([py, "-m", "pip", "install", "-q", "torch==2.13.0"])
        sh([py, "-m", "pip", "install", "-q", *pins])
        (Path(venv) / ".ready").touch()
    return Path(venv)


def run_in_venv(venv: Path, script: str, model_dir: Path, prompt: list[int], new_tokens: int, threads: int,
                *extra) -> dict:
    """bench/<script> under the side venv: its last stdout line, JSON."""
    res = sh([Path(venv) / "bin" / "python", ROOT / "bench" / script, model_dir, "--prompt-ids", ",".join(map(str, prompt)),
              "--new-tokens", new_tokens, "--threads", threads, *extra], capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def ratio_lines(speedups: dict) -> list[str]:
    """The markdown table of side-by-side ratios, with the roofline where there is one."""
    lines = ["| ratio (same round) | measured | roofline | measured ÷ roofline |", "|---|---|---|---|"]
    for name, s in speedups.items():
        lines.append(f"| {name} | {s['measured']} | {s.get('roofline', '')} | {s.get('of_roofline', '')} |")
    return lines


def parity_cells(manifest: dict | None) -> str:
    if not manifest or not manifest.get("parity"):
        return " | "
    p = manifest["parity"]
    return f"{p['greedy_match']}/{p['greedy_total']} | {p['max_abs_logit_err']:.3g}"


def publish(out_md: Path, result: dict, render: Callable[[dict], str]) -> None:
    """Write a benchmark's result as JSON beside its markdown table (same stem, .json), and print the table."""
    out_md = Path(out_md) if Path(out_md).suffix else Path(out_md).with_suffix(".md")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    write_json(out_md.with_suffix(".json"), result)
    out_md.write_text(render(result))
    print(out_md.read_text())
