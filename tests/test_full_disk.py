"""A full disk: an export, or a training checkpoint, into a small size-limited filesystem (tmpfs) fails
with one line and exit 2; nothing half-written at --out, and the previous checkpoint intact."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import save_with_tokenizer, tiny_dense

ROOT = Path(__file__).resolve().parents[1]


def cli(*argv) -> list[str]:
    return [sys.executable, "-m", "d2m_export.cli", *map(str, argv)]


@contextlib.contextmanager
def small_filesystem(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` (needs root, which this project's machines and CI have)."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("d2m-export: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, repr(stderr[-1500:])
    return lines[0]


def test_export_into_a_full_disk_fails_with_one_line_and_leaves_nothing(tmp_path, tokenizer_dir):
    model = save_with_tokenizer(tiny_dense("llama"), tmp_path / "tiny", tokenizer_dir)
    with small_filesystem(tmp_path / "small", "2m") as small:      # the tiny model's fp32 ONNX data is ~6 MB
        res = subprocess.run(cli("--target", "onnx", "--model", model, "--out", small / "out"), cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 2, res.stderr[-3000:]
        assert "No space left on device" in one_error_line(res.stderr)
        assert list(small.iterdir()) == []                          # neither the output nor its temporary


def test_checkpoint_into_a_full_disk_fails_with_one_line_and_keeps_the_previous_one(tmp_path, tokenizer_dir):
    from d2m_export.methods import get_method
    from d2m_export.plan import Block, Options, Plan

    plan = Plan("lfuc", 6, [Block(1, [2, 3])], Options(top_k=1, router_init="zero"))
    model = save_with_tokenizer(get_method("lfuc").build(tiny_dense("llama"), plan), tmp_path / "moe", tokenizer_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(20000)))
    with small_filesystem(tmp_path / "small", "200m") as small:
        out = small / "run"
        args = ["train", "--model", model, "--corpus", corpus, "--tokens", 200 * 4 * 32, "--seq-len", 32,
                "--micro-batch", 2, "--global-batch", 4, "--save-every", 2, "--out", out]
        proc = subprocess.Popen(cli(*args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        first = out / "checkpoints" / "step-000002"
        deadline = time.time() + 300
        while not (first / "trainer.json").is_file():
            assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
            time.sleep(0.02)
        with open(small / "filler", "wb") as f:                      # now the disk fills up
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 2, stderr[-3000:]
        line = one_error_line(stderr)
        assert "No space left on device" in line or "checkpoint" in line
        done = sorted(p.name for p in (out / "checkpoints").glob("step-*") if (p / "trainer.json").is_file())
        assert done and not list((out / "checkpoints").glob(".step-*.tmp"))   # complete ones only, no half-written one
        latest = out / "checkpoints" / done[-1]
        assert json.loads((latest / "trainer.json").read_text())["step"] == int(done[-1].split("-")[1])
        from safetensors.torch import load_file
        assert load_file(latest / "model.safetensors")                      # readable
        assert not (out / "config.json").exists()
        (small / "filler").unlink()                                      # space again: the run resumes from it
        res = subprocess.run(cli(*args, "--resume"), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert (out / "config.json").is_file()
