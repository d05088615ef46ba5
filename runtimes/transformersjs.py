"""transformers.js runners: a web export run by `@huggingface/transformers` in Node, as an app runs it.

One Node process per runner (`web/d2m_web.mjs serve`), spoken to in JSON lines: `prefill`/`decode` are one
forward pass each of the transformers.js model, its KV cache (`present.*` fed back as `past_key_values.*`)
kept in Node between calls; the logits of the last position come back as float32 bytes. Two runtimes:
- `web`: transformers.js's own choice in Node, onnxruntime-node on the CPU execution provider;
- `web-wasm`: the same library handed onnxruntime-web, the WebAssembly build a browser runs (still in Node).
The npm packages come from `web/package-lock.json` (`make web` runs `npm ci`); nothing is downloaded at run time.
"""
from __future__ import annotations

import base64
import functools
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from d2m_export.errors import UserError
from runtimes.base import Runner, register_runner

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
SCRIPT = WEB_DIR / "d2m_web.mjs"


MIN_NODE = 20            # transformers.js 4.x's image dependency (sharp) asks for it


@functools.lru_cache(maxsize=4)
def _node_major(node: str) -> int | None:
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout
        return int(out.strip().lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def node_command() -> list[str]:
    """`node web/d2m_web.mjs`, or a one-line UserError saying what to install."""
    node = shutil.which("node")
    if node is None:
        raise UserError("the web runtime needs Node.js (node) on PATH: install Debian's nodejs and npm, then run make web")
    major = _node_major(node)
    if major is not None and major < MIN_NODE:
        raise UserError(f"the web runtime needs Node.js {MIN_NODE} or newer; {node} is version {major}")
    if not (WEB_DIR / "node_modules" / "@huggingface" / "transformers").is_dir():
        raise UserError(f"transformers.js is not installed in {WEB_DIR.name}/: run make web (npm ci there)")
    return [node, str(SCRIPT)]


@register_runner("web")
class TransformersJsRunner(Runner):
    """Options: `n_ctx` (the longest sequence; default: the export's positions), `kv_type` (only "f32")."""
    backend = "node"
    proc = None
    _stderr = None

    def load(self, export_dir: Path) -> "TransformersJsRunner":
        kv_type = self.options.get("kv_type") or "f32"
        if kv_type != "f32":
            raise UserError(f"transformers.js keeps the graph's f32 KV cache; kv_type {kv_type!r} is not offered")
        self.export_dir = Path(export_dir)
        max_positions = int((self.manifest.get("web") or {}).get("max_positions") or 0) or None
        self.n_ctx = int(self.options.get("n_ctx") or max_positions or 4096)
        if max_positions and self.n_ctx > max_positions:
            raise UserError(f"n_ctx {self.n_ctx} exceeds the export's {max_positions} positions")
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([*node_command(), "serve"], cwd=WEB_DIR, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1)
        try:
            self.settings = {**self._call("load", dir=str(self.export_dir.resolve()), threads=self.threads,
                                          backend=self.backend)["settings"], "n_ctx": self.n_ctx, "kv_type": "f32"}
        except BaseException:
            self.close()
            raise
        self.pos = 0
        return self

    def _call(self, cmd: str, **args) -> dict:
        if self.proc is None:
            raise UserError("the transformers.js runner is closed")
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass                                   # the process died: its stderr says why, below
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._stderr.seek(0)
            tail = [ln for ln in self._stderr.read().strip().splitlines() if ln.strip()][-1:] or ["no message"]
            raise UserError(f"transformers.js (Node) exited with code {self.proc.returncode}: {tail[0][:300]}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise UserError(f"transformers.js: {reply.get('error')}")
        return reply

    @staticmethod
    def _logits(reply: dict) -> np.ndarray:
        return np.frombuffer(base64.b64decode(reply["logits"]), dtype="<f4").copy()

    def _check_room(self, n: int) -> None:
        if self.pos + n > self.n_ctx:
            raise UserError(f"sequence of {self.pos + n} tokens exceeds n_ctx {self.n_ctx}")

    def prefill(self, token_ids: list[int]) -> np.ndarray:
        if not token_ids:
            raise UserError("prefill needs at least one token")
        self.pos = 0
        self._check_room(len(token_ids))
        logits = self._logits(self._call("prefill", ids=[int(t) for t in token_ids]))
        self.pos = len(token_ids)
        return logits

    def decode(self, token_id: int) -> np.ndarray:
        if self.pos == 0:
            raise UserError("decode needs a prefilled sequence")
        self._check_room(1)
        logits = self._logits(self._call("decode", id=int(token_id)))
        self.pos += 1
        return logits

    def reset(self) -> None:
        self.pos = 0         # the next prefill starts a new cache in Node

    def tokenize(self, text: str) -> list[int]:
        """The ids transformers.js's tokenizer (from the export's tokenizer files) gives `text`."""
        return [int(t) for t in self._call("tokenize", text=text)["ids"]]

    def transformers_generate(self, prompt_ids: list[int], max_new_tokens: int) -> dict:
        """transformers.js `generate()`, greedy, exactly `max_new_tokens` tokens (no stop at EOS):
        {tokens, prefill_ms, decode_ms, decode_tokens_per_s}, timed in Node by a streamer."""
        self._check_room(len(prompt_ids) + max_new_tokens)
        reply = self._call("generate", ids=[int(t) for t in prompt_ids], max_new_tokens=int(max_new_tokens))
        reply.pop("ok")
        return reply

    def close(self) -> None:
        """Ends the Node process; its peak RSS goes into `settings["node_peak_rss_mb"]` (the runtime's memory is
        there, not in this process, whose own peak `bench` reports)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.settings["node_peak_rss_mb"] = round(self._call("stats")["peak_rss_mb"], 1)
            except (UserError, OSError, ValueError):
                pass
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.stdin.close()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if getattr(self, "_stderr", None) is not None:
            self._stderr.close()
            self._stderr = None


@register_runner("web", name="web-wasm")
class TransformersJsWasmRunner(TransformersJsRunner):
    backend = "wasm"
