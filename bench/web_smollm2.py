"""transformers.js on SmolLM2: decode speed of web exports in Node and in headless Chromium (WebAssembly).

Variants: dense SmolLM2-135M, layer pruning and LF-UC at --ratio (0.8), each exported `--target web` at fp32,
q8 and q4; the anchor is optimum's ONNX export of the dense model (`optimum-cli export onnx --task
text-generation-with-past`, what transformers.js model repositories hold), put in transformers.js's layout
(`onnx/model.onnx`) and, with --optimum-quants, quantized as those repositories are (q8: onnxruntime's
quantize_dynamic; q4: its MatMulNBits quantizer, blocks of 32). Runtimes: transformers.js in Node
(onnxruntime-node, CPU, --node-threads) and the export's own page (`index.html`, served as `d2m-export serve`
serves it) in headless Chromium, onnxruntime-web WebAssembly at 1 and 2 threads. Every cell generates
--new-tokens greedy tokens from the same prompt (no early end of sequence); decode tok/s runs from the second
generated token to the last, timed by transformers.js's streamer (Node) or the page (#tok-s).

Side by side: each round runs every cell once, in turn; ratios are taken within a round, medians over rounds.
The results are written after every round, so a run cut short still publishes its rounds; the cells not
measured are named. The speed does not depend on healing: the conversions are --no-heal unless --lfuc/--prune
name converted models. Run it niced on a shared machine.

Rerun:  python bench/web_smollm2.py [--rounds 3] [--optimum-venv .venv-optimum]
        (writes bench/results/web_smollm2.md and .json)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sidebyside import ROOT, convert, done, export, publish, sh  # noqa: E402

from d2m_export.devices.roofline import predicted_speedup  # noqa: E402
from d2m_export.sources.models import DEFAULT_MODEL, read_config, resolve_model  # noqa: E402
from d2m_export.sources.params import param_counts  # noqa: E402
from runtimes.chromium_page import page_query, run_page  # noqa: E402
from runtimes.transformersjs import WEB_DIR, node_command  # noqa: E402
from runtimes.web_server import make_server, page_url  # noqa: E402

QUANTS = ("fp32", "q8", "q4")
ROOFLINE_PRECISION = {"fp32": "fp32", "q8": "int8", "q4": "int4"}
RUNTIMES = ("node", "chromium 1 thread", "chromium 2 threads")
PROMPT = "The history of the printing press begins in the fifteenth century, when"
SUFFIX = {"fp32": "", "q8": "_quantized", "q4": "_q4"}
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def optimum_folder(venv: Path, dense: Path, tokenizer_from: Path, work: Path, quants: tuple[str, ...]) -> Path:
    """optimum's export of the dense model as a transformers.js folder: onnx/model{suffix}.onnx per quant; the
    tokenizer files from `tokenizer_from` where optimum wrote none."""
    out = work / "optimum-web"
    raw = work / "optimum-onnx"
    if not done(raw, "model.onnx"):
        tmp = work / "optimum-onnx.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        sh([venv / "bin" / "optimum-cli", "export", "onnx", "--model", dense, "--task", "text-generation-with-past", tmp])
        tmp.rename(raw)
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source = raw / name if (raw / name).is_file() else tokenizer_from / name
        if source.is_file() and not (out / name).is_file():
            shutil.copy2(source, out / name)
    for name in ("index.html", "page.js"):           # the same page as ours
        shutil.copy2(WEB_DIR / "page" / name, out / name)
    graph = out / "onnx" / "model.onnx"
    if not graph.is_file():
        # one file (< 2 GB): transformers.js then loads no external data
        sh([venv / "bin" / "python", "-c", "import onnx, sys; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])",
            raw / "model.onnx", graph])
    for quant in quants:
        target = out / "onnx" / f"model{SUFFIX[quant]}.onnx"
        if quant == "fp32" or target.is_file():
            continue
        code = ("from onnxruntime.quantization import quantize_dynamic, QuantType; "
                "quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QUInt8)") if quant == "q8" else (
                "import onnx; from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer; "
                "q = MatMulNBitsQuantizer(onnx.load(sys.argv[1]), block_size=32, is_symmetric=True); q.process(); "
                "q.model.save_model_to_file(sys.argv[2], False)")
        sh([sys.executable, "-c", "import sys; " + code, graph, target])      # onnxruntime's tools, in our venv
    return out


def set_dtype(folder: Path, quant: str) -> None:
    """config.json's transformers.js_config names the graph transformers.js loads (optimum's folder holds several)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["transformers.js_config"] = {"dtype": quant}
    path.write_text(json.dumps(config, indent=2) + "\n")


def node_decode(folder: Path, new_tokens: int, threads: int) -> float:
    res = subprocess.run([*node_command(), "generate", str(folder.resolve()), "--prompt", PROMPT, "--max-new-tokens",
                          str(new_tokens), "--threads", str(threads), "--backend", "node"],
                         capture_output=True, text=True, timeout=900, cwd=WEB_DIR)
    if res.returncode != 0:
        raise RuntimeError(f"node: {res.stderr.strip()[-300:]}")
    out = json.loads(res.stdout)
    assert len(out["tokens"]) == new_tokens, out
    return out["decode_tokens_per_s"]


def chromium_decode(url: str, new_tokens: int, threads: int) -> float:
    got = run_page(url + page_query(PROMPT, new_tokens, min_new_tokens=new_tokens, device="wasm", threads=threads),
                   timeout_s=900)
    assert len(got["token-ids"]) == new_tokens and got["backend"].startswith("WASM"), got
    return got["tok-s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--node-threads", type=int, default=2)
    ap.add_argument("--quants", default=",".join(QUANTS))
    ap.add_argument("--runtimes", default=",".join(RUNTIMES))
    ap.add_argument("--lfuc", type=Path, help="a converted LF-UC model to use (default: convert, --no-heal)")
    ap.add_argument("--prune", type=Path, help="a pruned model to use (default: convert, --no-heal)")
    ap.add_argument("--optimum-venv", type=Path, default=ROOT / ".venv-optimum",
                    help="a venv with optimum-onnx (make optimum-env); absent: no anchor")
    ap.add_argument("--optimum-quants", default="fp32", help="the anchor's quants (default fp32; q8, q4 as "
                    "transformers.js repositories quantize)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_web"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "web_smollm2.md")
    args = ap.parse_args()
    quants, runtimes = tuple(args.quants.split(",")), tuple(args.runtimes.split(","))
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    args.load_at_start = round(os.getloadavg()[0], 2)

    dense = resolve_model(DEFAULT_MODEL)
    models = {"dense": DEFAULT_MODEL,
              "prune": args.prune or convert("prune", args.ratio, work / f"prune-{args.ratio}", "--no-heal"),
              "lfuc": args.lfuc or convert("lfuc", args.ratio, work / f"lfuc-{args.ratio}", "--no-heal")}
    folders = {}
    for quant in quants:
        for name, model in models.items():
            folders[f"{name} {quant}"] = work / f"{name}-{quant}"
            # the parity of web exports is checked by the export itself and tests; here only speed
            export(model, "web", folders[f"{name} {quant}"], "--quant", quant, "--no-parity")
    missing = []
    optimum_quants = tuple(q for q in args.optimum_quants.split(",") if q in quants)
    if (args.optimum_venv / "bin" / "optimum-cli").is_file():
        anchor = optimum_folder(args.optimum_venv, dense, folders[f"dense {quants[0]}"], work, optimum_quants)
        for quant in optimum_quants:         # one folder per dtype: config.json names the graph to load
            folder = work / f"optimum-{quant}"
            if not (folder / "tokenizer.json").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                shutil.copytree(anchor, folder, ignore=shutil.ignore_patterns("model*.onnx*"))
                (folder / "onnx").mkdir(exist_ok=True)
                (folder / "onnx" / f"model{SUFFIX[quant]}.onnx").symlink_to(anchor / "onnx" / f"model{SUFFIX[quant]}.onnx")
                set_dtype(folder, quant)
            if not (folder / "manifest.json").is_file():     # what `serve` checks: a web folder with its page
                files = [f"onnx/model{SUFFIX[quant]}.onnx", "index.html", "page.js"]
                (folder / "manifest.json").write_text(json.dumps(
                    {"target": "web", "files": files, "quant": quant,
                     "made_by": "optimum-cli export onnx, arranged by bench/web_smollm2.py"}, indent=2) + "\n")
            folders[f"optimum {quant}"] = folder
    else:
        missing.append(f"optimum's export: no optimum-cli in {args.optimum_venv} (make optimum-env)")
    missing += [f"optimum {q}: not measured (--optimum-quants)" for q in quants if q not in optimum_quants]

    servers = {}
    for name, folder in folders.items():
        server = make_server(folder, 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[name] = page_url(server)
    rows: list[dict] = []
    for r in range(args.rounds):
        row = {}
        for name in folders:             # every cell once per round, in turn
            for rt in runtimes:
                try:
                    if rt == "node":
                        row[f"{name} | {rt}"] = node_decode(folders[name], args.new_tokens, args.node_threads)
                    else:
                        row[f"{name} | {rt}"] = chromium_decode(servers[name], args.new_tokens, int(rt.split()[1]))
                except Exception as e:     # recorded as a missing cell, with why
                    print(f"{name} | {rt}: {e}", flush=True)
                    row[f"{name} | {rt}"] = None
                print(f"round {r + 1}: {name} | {rt}: {row[f'{name} | {rt}']}", flush=True)
        rows.append(row)
        write(args, rows, models, folders, runtimes, quants, missing, t_start)


def ratio(rows, a, b):
    values = [row[a] / row[b] for row in rows if row.get(a) and row.get(b)]
    return round(statistics.median(values), 3) if values else None


def write(args, rows, models, folders, runtimes, quants, missing, t_start) -> None:
    dense_cfg = read_config(resolve_model(DEFAULT_MODEL))
    lfuc_cfg = read_config(resolve_model(str(models["lfuc"])))
    prune_cfg = read_config(resolve_model(str(models["prune"])))
    context = len(PROMPT.split()) + args.new_tokens
    cells = {}
    for key in rows[0]:
        values = [row[key] for row in rows if row.get(key)]
        cells[key] = round(statistics.median(values), 2) if values else None
    ratios = {}
    for q in quants:
        roof = round(predicted_speedup(dense_cfg, lfuc_cfg, ROOFLINE_PRECISION[q], context), 3)
        for rt in runtimes:
            entry = {"lfuc/dense": ratio(rows, f"lfuc {q} | {rt}", f"dense {q} | {rt}"), "roofline": roof,
                     "lfuc/prune": ratio(rows, f"lfuc {q} | {rt}", f"prune {q} | {rt}"),
                     "dense/optimum": ratio(rows, f"dense {q} | {rt}", f"optimum {q} | {rt}"),
                     "lfuc/optimum": ratio(rows, f"lfuc {q} | {rt}", f"optimum {q} | {rt}")}
            if entry["lfuc/dense"]:
                entry["of_roofline"] = round(entry["lfuc/dense"] / roof, 3)
            ratios[f"{q} | {rt}"] = entry
    unmeasured = sorted(k for k, v in cells.items() if v is None)
    result = {"model": DEFAULT_MODEL, "ratio": args.ratio, "rounds": len(rows), "rounds_asked": args.rounds,
              "new_tokens": args.new_tokens, "prompt": PROMPT, "node_threads": args.node_threads,
              "active_params": {"dense": param_counts(dense_cfg).active, "prune": param_counts(prune_cfg).active,
                                "lfuc": param_counts(lfuc_cfg).active},
              "models": {k: str(v) for k, v in models.items()},
              "artifact_mb": {name: round(sum(f.stat().st_size for f in (folder / "onnx").iterdir()) / 2**20, 1)
                              for name, folder in folders.items()},
              "cells": cells, "ratios": ratios, "rows": rows, "missing": missing + [f"{k}: failed" for k in unmeasured],
              "wall_s": round(time.time() - t_start, 1),
              "load_1min": [args.load_at_start, round(os.getloadavg()[0], 2)]}
    publish(args.out, result, render)


def render(r: dict) -> str:
    runtimes = sorted({k.split(" | ")[1] for k in r["cells"]}, key=lambda x: RUNTIMES.index(x) if x in RUNTIMES else 9)
    names = list(dict.fromkeys(k.split(" | ")[0] for k in r["cells"]))
    a = r["active_params"]
    lines = [f"# transformers.js decode on {r['model']}: Node and headless Chromium (WebAssembly)", "",
             f"{r['new_tokens']} greedy tokens after a {len(r['prompt'].split())}-word prompt; decode tok/s from the "
             f"second generated token to the last; medians over {r['rounds']} of {r['rounds_asked']} rounds, each "
             f"round running every cell once, side by side. Node: onnxruntime-node, CPU, {r['node_threads']} "
             f"threads; Chromium: the export's page (index.html), onnxruntime-web WASM. Active parameters: dense "
             f"{a['dense']:,}, prune@{r['ratio']} {a['prune']:,}, LF-UC@{r['ratio']} {a['lfuc']:,} (unhealed: "
             "healing does not change the speed). optimum: `optimum-cli export onnx` of the dense model in "
             "transformers.js's layout.", "",
             "| variant | " + " | ".join(f"{rt} tok/s" for rt in runtimes) + " | onnx/ MB |",
             "|---|" + "---|" * (len(runtimes) + 1)]
    for name in names:
        cells = [r["cells"].get(f"{name} | {rt}") for rt in runtimes]
        lines.append(f"| {name} | " + " | ".join("—" if c is None else f"{c}" for c in cells)
                     + f" | {r['artifact_mb'].get(name, '')} |")
    lines += ["", "Ratios, each taken within a round (median over rounds); roofline: LF-UC ÷ dense bytes per token.", "",
              "| quant | runtime | LF-UC ÷ dense | roofline | of roofline | LF-UC ÷ prune | dense ÷ optimum | LF-UC ÷ optimum |",
              "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "—" if v is None else f"{v}"  # noqa: E731
    for key, e in r["ratios"].items():
        lines.append(f"| {key} | {fmt(e['lfuc/dense'])} | {e['roofline']} | {fmt(e.get('of_roofline'))} | "
                     f"{fmt(e['lfuc/prune'])} | {fmt(e['dense/optimum'])} | {fmt(e['lfuc/optimum'])} |")
    if r["missing"]:
        lines += ["", "Not measured:", "", *(f"- {m}" for m in r["missing"])]
    lines += ["", f"Wall time: {r['wall_s']:.0f} s; 1-minute load average at the start {r['load_1min'][0]}, at the "
              f"end {r['load_1min'][1]} (two cores; the benchmark itself keeps about 1-2 busy). Rerun: "
              f"`python bench/web_smollm2.py --optimum-quants fp32,q8,q4`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
