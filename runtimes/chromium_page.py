"""A web export's page run in headless Chromium, as tests and benchmarks open it.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: requests on the
child's fd 3, replies on its fd 4, each a JSON message ended by a NUL byte), so no WebSocket client is needed:
open the page's URL, then read the page's result elements (`#status`, `#token-ids`, `#tok-s`, `#backend`,
`#output`) until `#status` says "done" or "error: ...", and the URLs it fetched. `--dump-dom` cannot do this: it snapshots the page
before WebAssembly has finished.
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from urllib.parse import urlencode

from d2m_export.errors import UserError

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
         "--disable-extensions", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--mute-audio", "--remote-debugging-pipe"]
# WebGPU without a GPU: Chromium's software Vulkan (SwiftShader), which it offers only when asked (slow, no shader-f16)
SOFTWARE_WEBGPU = ["--enable-unsafe-webgpu", "--use-angle=swiftshader", "--enable-features=Vulkan"]
# the result elements' texts, and every URL the page fetched (resource timing)
READ_RESULT = """JSON.stringify({...Object.fromEntries(['status', 'token-ids', 'tok-s', 'backend', 'output', 'top1-ids']
    .map((id) => [id, document.getElementById(id)?.textContent ?? null])),
    resources: performance.getEntriesByType('resource').map((e) => e.name)})"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def page_query(prompt: str, max_new_tokens: int, **params) -> str:
    """`?prompt=...&max_new_tokens=N&...` for the page (None values left out)."""
    return "?" + urlencode({"prompt": prompt, "max_new_tokens": max_new_tokens,
                            **{k: v for k, v in params.items() if v is not None}})


class DevTools:
    """One headless Chromium process and the DevTools protocol over its pipe."""

    def __init__(self, timeout_s: float = 60.0, webgpu: bool = False):
        binary = chromium()
        if binary is None:
            raise UserError("headless Chromium is not installed (Debian: apt-get install chromium)")
        self.profile = tempfile.TemporaryDirectory(prefix="d2m-chromium-")
        to_child, self._write = os.pipe()           # the child reads requests on fd 3
        self._read, from_child = os.pipe()          # and writes replies on fd 4
        # the child's ends above 4 first, so that moving them to 3 and 4 cannot close one another
        to_child, from_child = (self._above_4(fd) for fd in (to_child, from_child))
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [shutil.which("bash") or "/bin/bash", "-c", f'exec "$0" "$@" 3<&{to_child} 4>&{from_child} {to_child}<&- {from_child}>&-',
             binary, *(f for f in FLAGS if not (webgpu and f == "--disable-gpu")), *(SOFTWARE_WEBGPU if webgpu else []),
             f"--user-data-dir={self.profile.name}", "about:blank"],
            pass_fds=(to_child, from_child), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr)
        os.close(to_child)
        os.close(from_child)
        self._buffer = b""
        self._next_id = 0
        self.timeout_s = timeout_s

    @staticmethod
    def _above_4(fd: int) -> int:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
        os.close(fd)
        return high

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                raise UserError(f"Chromium exited: {self._stderr_tail()}")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        """Send one request and wait for its reply (events in between are dropped)."""
        self._next_id += 1
        request = {"id": self._next_id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._write, json.dumps(request).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise UserError(f"Chromium: {method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    def open(self, url: str) -> str:
        """A new tab on `url`; its session id."""
        target = self.call("Target.createTarget", url=url)["targetId"]
        return self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def evaluate(self, session: str, expression: str):
        """The expression's value in the tab; None while a navigation has no document to evaluate it in yet."""
        try:
            result = self.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
        except UserError as e:
            if "context" in str(e):      # "Cannot find default execution context", "... context was destroyed"
                return None
            raise
        if "exceptionDetails" in result:
            raise UserError(f"Chromium: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def _stderr_tail(self) -> str:
        self.stderr.seek(0)
        lines = [ln for ln in self.stderr.read().decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "no message"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.write(self._write, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
                self.proc.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for fd in (self._write, self._read):
            try:
                os.close(fd)
            except OSError:
                pass
        self.stderr.close()
        self.profile.cleanup()

    def __enter__(self) -> "DevTools":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_page(url: str, timeout_s: float = 300.0, poll_s: float = 0.25, webgpu: bool = False) -> dict:
    """Open the page at `url` (with its query) in headless Chromium and wait for it to finish: its result
    elements' texts, `token-ids` parsed, `tok-s` as a float. A page error or a timeout raises UserError.
    `webgpu`: offer WebGPU on Chromium's software renderer (else the GPU is off: WebAssembly only)."""
    with DevTools(webgpu=webgpu) as browser:
        session = browser.open(url)
        deadline = time.monotonic() + timeout_s
        state = {}
        while time.monotonic() < deadline:
            state = json.loads(browser.evaluate(session, READ_RESULT) or "{}")
            status = state.get("status") or ""
            if status == "done":
                return {**state, "token-ids": json.loads(state["token-ids"] or "null"),
                        "top1-ids": json.loads(state.get("top1-ids") or "null"),
                        "tok-s": float(state["tok-s"]) if state.get("tok-s") else None}
            if status.startswith("error"):
                raise UserError(f"the page in Chromium: {status}")
            time.sleep(poll_s)
        raise UserError(f"the page in Chromium did not finish in {timeout_s:g} s (status: {state.get('status')!r})")
