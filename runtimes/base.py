"""The interface every runner implements, and the registry that names them by export target.

A runner loads one export directory (an artifact plus `manifest.json` and the tokenizer files)
and runs it in the real runtime: `prefill` a prompt, then `decode` one token at a time. Both
return the logits of the last position as a 1-D float32 numpy array, so that the parity check
and the benchmark never depend on a runtime's own sampling code.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from d2m_export.errors import UserError
from d2m_export.outputs import verify_checksums

RUNNERS: dict[str, type["Runner"]] = {}
MANIFEST = "manifest.json"


def _flush_c_stdio() -> None:
    import ctypes

    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


NATIVE_LOGS = {"show": False}         # the command line's -v turns them on


def show_native_logs(show: bool) -> None:
    NATIVE_LOGS["show"] = bool(show)


@contextmanager
def quiet_native_stderr():
    """Native runtimes print straight to file descriptor 2 (ExecuTorch's cpuinfo and threadpool lines on
    every load); that goes to /dev/null unless `show_native_logs(True)` (the command line's `-v`)."""
    if NATIVE_LOGS["show"]:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        _flush_c_stdio()        # what the C library still buffers goes where it was written, not to the terminal
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def register_runner(target: str, name: str | None = None):
    """Class decorator: `@register_runner("gguf")` makes the class the runner for that target;
    `@register_runner("onnx", name="onnxruntime-genai")` another runtime for the same exports, chosen
    by name (`--runtime`)."""
    def wrap(cls):
        cls.target, cls.runtime = target, name or target
        RUNNERS[cls.runtime] = cls
        return cls
    return wrap


# runtime name -> (the export target it runs, the module holding its runner), imported on demand (a
# benchmark then loads only its own runtime); a target's default runtime carries the target's name.
RUNTIMES = {"gguf": ("gguf", "runtimes.llamacpp"), "coreml": ("coreml", "runtimes.coreml"),
            "executorch": ("executorch", "runtimes.executorch"), "onnx": ("onnx", "runtimes.onnxruntime"),
            "onnxruntime-genai": ("onnx", "runtimes.onnxruntime_genai"), "web": ("web", "runtimes.transformersjs"),
            "web-wasm": ("web", "runtimes.transformersjs")}


def runtimes_for(target: str) -> list[str]:
    return [name for name, (t, _) in RUNTIMES.items() if t == target]


def _discover() -> None:
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):     # this package's modules
        if info.name not in ("base", "bench"):
            try:
                importlib.import_module(f"runtimes.{info.name}")
            except ImportError:     # a runtime whose package is not installed offers no runner
                pass


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 4))


STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "</s>")

class Runner:
    target: str

    def __init__(self, threads: int | None = None, **options):
        self.threads = threads or default_threads()
        self.options = options
        self.export_dir: Path | None = None
        self.manifest: dict = {}
        self.settings: dict = {}          # what the runtime was actually set to (for reports)

    # --- what each runtime implements -------------------------------------------------
    @classmethod
    def check_host(cls, export_dir: Path) -> None:
        """Refuses, before anything else is checked or loaded, a machine this runtime cannot run on."""

    def load(self, export_dir: Path) -> "Runner":
        raise NotImplementedError

    def prefill(self, token_ids: list[int]) -> np.ndarray:
        """Start a new sequence with `token_ids`; return the logits of its last position."""
        raise NotImplementedError

    def decode(self, token_id: int) -> np.ndarray:
        """Append one token to the current sequence; return its logits."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the current sequence (its KV cache)."""
        raise NotImplementedError

    def rewind(self, n_tokens: int) -> None:
        """Keep only the first `n_tokens` of the current sequence: the next decode is at position `n_tokens`,
        attending to exactly those. Runtimes that cannot drop the end of their KV cache raise
        NotImplementedError (the speed benchmark then prefills again)."""
        raise NotImplementedError

    def _check_rewind(self, n_tokens: int, length: int) -> None:
        if not 0 < n_tokens <= length:
            raise UserError(f"cannot rewind a sequence of {length} tokens to {n_tokens}")

    def close(self) -> None:
        pass

    # --- shared on top of prefill/decode ------------------------------------------------
    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: Iterable[int] = (),
                 on_token: Callable[[int], None] | None = None) -> list[int]:
        """Greedy decoding: the argmax of each step's logits, up to `max_new_tokens` or a stop id."""
        stop = set(stop_ids)
        out: list[int] = []
        if max_new_tokens <= 0:
            return out
        logits = self.prefill(list(prompt_ids))
        while True:
            token = int(np.argmax(logits))
            out.append(token)
            if on_token:
                on_token(token)
            if token in stop or len(out) >= max_new_tokens:
                return out
            logits = self.decode(token)

    def greedy_text(self, tokenizer, prompt: str, max_new_tokens: int) -> str:
        """The prompt's greedy continuation, decoded (stops at the tokenizer's end-of-text tokens)."""
        stop = [i for i in (tokenizer.token_to_id(t) for t in STOP_TOKENS) if i is not None]
        return tokenizer.decode(self.generate(tokenizer.encode(prompt).ids, max_new_tokens, stop_ids=stop))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_manifest(export_dir: Path) -> dict:
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{export_dir} is not a d2m-export export directory ({MANIFEST} missing)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is corrupt ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("target"), str):
        raise UserError(f"{path} names no target")
    files = manifest.get("files")
    if not (isinstance(files, list) and files and all(isinstance(f, str) for f in files)):
        raise UserError(f"{path} lists no files; export again")
    return manifest


def runner_class(target: str, runtime: str | None = None) -> type[Runner]:
    """The runner for exports of `target`: its default one, or the one named `runtime`."""
    name = runtime or target
    if runtime is not None and runtime not in RUNTIMES:
        raise UserError(f"unknown --runtime {runtime!r}; for {target} exports: {', '.join(runtimes_for(target))}")
    if runtime is not None and RUNTIMES[runtime][0] != target:
        raise UserError(f"--runtime {runtime} does not run {target} exports; choose one of {', '.join(runtimes_for(target))}")
    if name not in RUNNERS:
        if name in RUNTIMES:
            try:
                importlib.import_module(RUNTIMES[name][1])
            except ImportError as e:
                raise UserError(f"the {name} runtime cannot be loaded ({e}); install its extra: "
                                f"pip install 'd2m-export[{target}]'") from None
        else:
            _discover()
    if name not in RUNNERS:
        raise UserError(f"no runner {name!r}; runners: {', '.join(sorted(RUNNERS))}")
    return RUNNERS[name]


def load_runner(export_dir: Path, threads: int | None = None, runtime: str | None = None, **options) -> Runner:
    """The runner for an export directory, chosen by its manifest's `target` (or named by `runtime`), loaded."""
    manifest = read_manifest(export_dir)
    for f in manifest["files"]:
        if not (Path(export_dir) / f).exists() or (manifest.get("checksums") and f not in manifest["checksums"]
                                                   and not (Path(export_dir) / f).is_dir()):
            raise UserError(f"{export_dir}/{MANIFEST} lists {f!r}, which is not part of this export; export again")
    if "checksums" in manifest:               # absent while the export's own parity check runs
        verify_checksums(export_dir, manifest["checksums"])
    runner = runner_class(manifest["target"], runtime)(threads=threads, **options)
    runner.manifest = manifest
    return runner.load(Path(export_dir))


def load_tokenizer(export_dir: Path):
    """The exported tokenizer (`tokenizer.json`, copied beside the artifact), without transformers."""
    from tokenizers import Tokenizer

    path = Path(export_dir) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{export_dir} has no tokenizer.json")
    return Tokenizer.from_file(str(path))
