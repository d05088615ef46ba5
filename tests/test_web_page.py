"""The page in every web export (`index.html`, `page.js`), served by `d2m-export serve` and run in headless
Chromium (offline, WebAssembly): the token ids it writes into `#token-ids` are transformers' greedy tokens.

Needs Node's packages (`make web`: the page's runtime is served from them) and Debian's chromium (`make
chromium`); skipped without them. Chromium is driven over the DevTools protocol on a pipe
(`runtimes.chromium_page`).
"""
from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import assert_user_error, run_cli, save_with_tokenizer
from runtimes.chromium_page import chromium, page_query, run_page
from runtimes.transformersjs import WEB_DIR
from onnx_helpers import build, hf_greedy, hf_model

pytestmark = [pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium (make chromium)"),
              pytest.mark.skipif(not (WEB_DIR / "node_modules" / "@huggingface" / "transformers").is_dir(),
                                 reason="needs web/node_modules (make web)")]

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Rain fell on the quiet village; the children ran"


@contextlib.contextmanager
def served(export_dir: Path):
    """`d2m-export serve DIR --port 0` in a child process: the page's URL while it runs; then Ctrl-C, which
    must stop it cleanly (exit 0)."""
    proc = subprocess.Popen([sys.executable, "-m", "d2m_export.cli", "serve", str(export_dir), "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving "), (line, proc.stderr.read() if proc.poll() is not None else "")
        yield line.split(" at ")[1].split()[0]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0 and out.strip().endswith("stopped"), (proc.returncode, out, err)


def export_web(capsys, model_dir: Path, out: Path, quant: str = "fp32") -> dict:
    # the export's own parity check (Node) is tested in test_web.py; here the page is what is checked
    code, _, err = run_cli(capsys, "--target", "web", "--model", model_dir, "--quant", quant, "--no-parity",
                           "--out", out)
    assert code == 0, err
    return json.loads((out / "manifest.json").read_text())


def page_tokens(url: str, prompt: str, n: int, timeout_s: float = 120, **params) -> dict:
    """The page's result for `prompt`: exactly `n` greedy tokens (min_new_tokens: no early end-of-sequence),
    as transformers' `generate(min_new_tokens=n)` in hf_greedy."""
    return run_page(url + page_query(prompt, n, min_new_tokens=n, device="wasm", **params), timeout_s=timeout_s)


@pytest.mark.parametrize("layout", ["convert-lfuc", "lfuc-routed-k1"])
def test_the_page_generates_transformers_greedy_tokens_in_chromium(capsys, converted, tmp_path, tokenizer_dir, layout):
    """What `convert` writes (LF-UC, its defaults) and a sensitive LF-UC with random routers (the first one's
    tiny weights repeat one token; these vary token by token)."""
    if layout == "convert-lfuc":
        model_dir = converted("lfuc")
    else:
        model_dir = save_with_tokenizer(build(layout), tmp_path / layout, tokenizer_dir)
    out = tmp_path / "web"
    manifest = export_web(capsys, model_dir, out)
    assert manifest["files"][-2:] == ["index.html", "page.js"] and manifest["web"]["page"].startswith("index.html")
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]
    want = hf_greedy(hf_model(model_dir), ids, 8)
    assert layout == "convert-lfuc" or len(set(want)) > 1
    with served(out) as url:
        got = page_tokens(url, PROMPT, 8, threads=2)
        check_served_files(url)
        if layout == "lfuc-routed-k1":   # where navigator.gpu gives an adapter the page picks WebGPU by itself
            gpu = run_page(url + page_query(PROMPT, 8, min_new_tokens=8), timeout_s=180, webgpu=True)
            assert gpu["backend"] == "WebGPU" and gpu["token-ids"] == want
    assert got["token-ids"] == want
    assert got["backend"] == "WASM (2 threads)"       # cross-origin isolated: the headers let threads run
    assert got["tok-s"] > 0 and got["output"].startswith(PROMPT)
    # everything the page loaded came from the server: no CDN; onnxruntime-web's wasm from the npm package
    origin = url.rsplit("/", 1)[0] + "/"
    assert got["resources"] and all(r.startswith(origin) for r in got["resources"]), got["resources"]
    assert any(r.endswith("/d2m-runtime/onnxruntime-web/ort-wasm-simd-threaded.asyncify.wasm") for r in got["resources"])


def test_a_q4_export_runs_in_chromium_as_in_node(capsys, tmp_path, tokenizer_dir, quant="q4"):
    """A q4 graph (MatMulNBits; the embedding looked up in standard ops, as the browser build has no
    GatherBlockQuantized: test_web.py compares both lookups) loads in the browser and generates the tokens
    transformers.js generates in Node."""
    from test_web import node_generate
    from transformers import AutoTokenizer

    model_dir = save_with_tokenizer(build("lfuc-routed-k1"), tmp_path / "model", tokenizer_dir)
    out = tmp_path / "web"
    export_web(capsys, model_dir, out, quant)
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]
    with served(out) as url:
        got = page_tokens(url, PROMPT, 8, threads=2)
    assert got["token-ids"] == node_generate(out, ids, 8)["tokens"]


def check_served_files(url: str) -> None:
    """COOP/COEP on every response, the right MIME types, the runtime's files from the installed packages, and
    nothing outside the export and those packages."""
    base = url.rsplit("/", 1)[0]
    for path, mime in [("/index.html", "text/html"), ("/page.js", "text/javascript"),
                       ("/d2m-runtime/transformers/transformers.min.js", "text/javascript"),
                       ("/d2m-runtime/onnxruntime-web/ort-wasm-simd-threaded.asyncify.mjs", "text/javascript"),
                       ("/d2m-runtime/onnxruntime-web/ort-wasm-simd-threaded.asyncify.wasm", "application/wasm")]:
        with urllib.request.urlopen(base + path, timeout=30) as response:
            assert response.headers["Content-Type"].startswith(mime), (path, response.headers["Content-Type"])
            assert response.headers["Cross-Origin-Opener-Policy"] == "same-origin"
            assert response.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    for path in ["/d2m-runtime/onnxruntime-web/../package.json", "/../../../etc/hostname", "/onnx/"]:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + path, timeout=30)
        assert e.value.code == 404, path


def test_serve_refuses_what_is_not_a_web_export_before_binding_a_port(capsys, tmp_path, monkeypatch):
    import runtimes.web_server as web_server

    def no_bind(*args, **kwargs):
        raise AssertionError("serve bound a port for a folder it refuses")

    monkeypatch.setattr(web_server, "PageServer", no_bind)
    code, _, err = run_cli(capsys, "serve", tmp_path / "missing")
    assert_user_error(code, err, "is not a directory")
    code, _, err = run_cli(capsys, "serve", tmp_path)
    assert_user_error(code, err, "is not a web export", "manifest.json missing")
    (tmp_path / "manifest.json").write_text(json.dumps({"target": "onnx", "files": ["model.onnx"]}))
    code, _, err = run_cli(capsys, "serve", tmp_path)
    assert_user_error(code, err, "is a onnx export, not a web export")
    (tmp_path / "manifest.json").write_text("{not json")
    code, _, err = run_cli(capsys, "serve", tmp_path)
    assert_user_error(code, err, "unreadable")
    (tmp_path / "manifest.json").write_text(json.dumps({"target": "web", "files": ["onnx/model.onnx"]}))
    code, _, err = run_cli(capsys, "serve", tmp_path)
    assert_user_error(code, err, "has no index.html", "export it again")
    code, _, err = run_cli(capsys, "serve", tmp_path, "--port", 70000)
    assert_user_error(code, err, "--port must be in [0, 65535]")


def test_serve_on_a_taken_port_says_so(capsys, tmp_path):
    import socket

    (tmp_path / "manifest.json").write_text(json.dumps({"target": "web", "files": ["index.html"]}))
    (tmp_path / "index.html").write_text("<!doctype html>")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, err = run_cli(capsys, "serve", tmp_path, "--port", taken.getsockname()[1])
    assert_user_error(code, err, "cannot serve on 127.0.0.1:", "choose another --port")


@pytest.fixture(scope="module")
def smollm2_lfuc(tmp_path_factory) -> Path:
    """The real SmolLM2-135M, LF-UC at 0.8 (unhealed), as `convert` writes it."""
    from d2m_export.cli import main

    out = tmp_path_factory.mktemp("smollm2") / "lfuc"
    assert main(["convert", "--method", "lfuc", "--target-active-ratio", "0.8", "--no-heal", "--out", str(out)]) == 0
    return out


def test_smollm2_lfuc_in_chromium_generates_transformers_greedy_tokens_at_fp32(capsys, tmp_path, smollm2_lfuc):
    """The real SmolLM2-135M LF-UC@0.8 at fp32, through the page in headless Chromium (WebAssembly, 2 threads):
    32 greedy tokens equal to transformers'. `full` (conftest FULL_ONLY): minutes."""
    out = tmp_path / "web"
    export_web(capsys, smollm2_lfuc, out)
    from transformers import AutoTokenizer
    prompt = "The history of the printing press begins"
    ids = AutoTokenizer.from_pretrained(smollm2_lfuc)(prompt)["input_ids"]
    want = hf_greedy(hf_model(smollm2_lfuc), ids, 32)
    with served(out) as url:
        got = page_tokens(url, prompt, 32, timeout_s=600, threads=2)
    assert got["token-ids"] == want, got["output"]


def test_smollm2_lfuc_q4_in_chromium_holds_the_onnx_floor(capsys, tmp_path, smollm2_lfuc):
    """The same model at q4: the export's own parity check (transformers.js in Node, the fixed text) holds the
    ONNX int4 floors, and in Chromium the page scores the fixed text teacher-forced with the top-1 agreement
    floor met where the reference is decisive (the mean-KL half of the floor needs full distributions, which
    only the Node check has). Greedy continuations are not compared: at int4, WebAssembly's and the native
    kernels' roundings split near-ties differently. `full` (conftest FULL_ONLY): minutes."""
    import torch
    from transformers import AutoTokenizer

    from converters.parity import DECISIVE_MARGIN, FIXED_TEXT

    out = tmp_path / "web-q4"
    code, _, err = run_cli(capsys, "--target", "web", "--model", smollm2_lfuc, "--quant", "q4", "--out", out)
    assert code == 0, err        # exit 0: Node's fixed-text check held the floors (else parity fails the export)
    floor = json.loads((out / "manifest.json").read_text())["parity"]["tolerance"]["min_decisive_top1_agreement"]
    ids = AutoTokenizer.from_pretrained(smollm2_lfuc)(FIXED_TEXT)["input_ids"]
    with torch.no_grad():
        ref = hf_model(smollm2_lfuc)(torch.tensor([ids])).logits[0].float()
    top2 = ref.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) >= DECISIVE_MARGIN
    with served(out) as url:
        got = run_page(url + page_query("", 1, device="wasm", threads=2, score_ids=",".join(map(str, ids))),
                       timeout_s=600)
    agree = torch.tensor(got["top1-ids"]) == ref.argmax(-1)
    assert int(decisive.sum()) >= 20 and len(got["top1-ids"]) == len(ids)
    assert float(agree[decisive].float().mean()) >= floor, (float(agree[decisive].float().mean()), floor)
