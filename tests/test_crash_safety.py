"""SIGKILL while a stage writes its output: nothing that looks complete at --out, and the next run into
the same --out works, cleaning the temporary directory the killed run left (never somebody else's).

Training's SIGKILL-then-resume is tested in test_train.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import save_with_tokenizer, tiny_dense

ROOT = Path(__file__).resolve().parents[1]
PLAN = "blocks:\n  - {host: 1, donors: [2, 3]}\n"


def cli(*argv) -> list[str]:
    return [sys.executable, "-m", "d2m_export.cli", *map(str, argv)]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("crash")
    dense = save_with_tokenizer(tiny_dense("llama"), root / "dense", tokenizer_dir)
    (root / "plan.yaml").write_text(PLAN)
    fused = root / "lfuc"
    res = subprocess.run(cli("convert", "--model", dense, "--plan", root / "plan.yaml", "--no-heal", "--out", fused),
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    return {"dense": dense, "lfuc": fused, "plan": root / "plan.yaml"}


STAGES = {
    "convert": lambda m: ["convert", "--model", m["dense"], "--plan", m["plan"]],
    "heal": lambda m: ["heal", "--model", m["lfuc"], "--calib-tokens", 1024, "--steps", 5],
    "onnx": lambda m: ["--target", "onnx", "--model", m["lfuc"], "--threads", 1],
    "gguf": lambda m: ["--target", "gguf", "--model", m["lfuc"], "--threads", 1],
    # the dense model: what is under test is the atomic output, and its export lowers no expert delegates
    "executorch": lambda m: ["--target", "executorch", "--model", m["dense"], "--threads", 1],
    "coreml": lambda m: ["--target", "coreml", "--model", m["lfuc"]],
}
COMPLETE = {"convert": "d2m_plan.json", "heal": "d2m_plan.json"}         # exports: manifest.json


WORKER = {"executorch"}                                  # builds its program in a process of its own


def workers(pid: int) -> list:
    return [c for c in psutil.Process(pid).children() if "spawn_main" in " ".join(c.cmdline())]


def ours(out: Path, foreign: Path) -> list[Path]:
    return [p for p in out.parent.glob(f".{out.name}.tmp-*") if p != foreign]


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigkill_leaves_nothing_complete_and_the_next_run_cleans_up(models, tmp_path, stage):
    if stage in ("executorch", "coreml"):
        pytest.importorskip(stage if stage == "executorch" else "coremltools")
    out = tmp_path / "out"
    foreign = tmp_path / ".out.tmp-someone-else"           # looks like ours by name, but has no owner file
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not d2m-export's")
    argv = [*STAGES[stage](models), "--out", out]

    proc = subprocess.Popen(cli(*argv), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    # kill the run while it writes its temporary output (and, where a worker process builds it, while
    # that worker runs: an orphaned worker would go on writing into the temporary the next run removes)
    while not ours(out, foreign) or (stage in WORKER and not workers(proc.pid)):
        assert proc.poll() is None and time.time() < deadline, f"{stage} ended before it could be killed"
        time.sleep(0.01)
    children = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"the killed {stage} left {[p.cmdline() for p in alive]} running"
    assert not out.exists(), f"a killed {stage} left {sorted(p.name for p in out.iterdir())} at --out"
    assert ours(out, foreign), "the killed run's temporary directory should still be there, for the next run to clean"

    res = subprocess.run(cli(*argv), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / COMPLETE.get(stage, "manifest.json")).is_file() and (out / ".d2m-export").is_file()
    assert not ours(out, foreign)                          # the stale temporary of ours is gone
    assert (foreign / "keep.txt").read_text() == "not d2m-export's"
    assert not list(tmp_path.glob(".out.old-*"))


def test_stale_temporaries_of_dead_runs_go_and_nothing_else(tmp_path):
    """Including a run killed between creating its temporary and writing its owner file (empty, pid in
    the name), which the SIGKILL tests can hit on a loaded machine, and a dead writer whose pid the
    system has given to another process since (its start time differs)."""
    from d2m_export.outputs import OWNER, _owner_line, remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    d, live = tmp_path, os.getpid()

    def make(name: str, owner: int | str | None = None, files: tuple[str, ...] = ()) -> None:
        (d / name).mkdir()
        if owner is not None:
            (d / name / OWNER).write_text(f"{owner}\n")
        for f in files:
            (d / name / f).write_text("x")

    make(f".out.tmp-{dead.pid}-a")                                  # killed before its owner file: empty
    make(f".out.tmp-{dead.pid}-b", owner=dead.pid, files=("model.onnx",))
    make(f".out.tmp-{dead.pid}-c", files=("theirs.txt",))           # no owner file and not empty: not ours
    make(".out.tmp-someone-else", files=("keep.txt",))
    make(f".out.tmp-{live}-d", owner=live)                          # its writer still runs
    make(f".out.tmp-{live}-e", owner=_owner_line())                 # so does this one, by pid and start time
    make(f".out.tmp-{live}-f", owner=f"{live} 12345.0", files=("model.onnx",))  # pid reused: its writer is dead
    removed = remove_stale_temporaries(d / "out")
    assert sorted(p.name for p in removed) == sorted([f".out.tmp-{dead.pid}-a", f".out.tmp-{dead.pid}-b",
                                                      f".out.tmp-{live}-f"])
    assert sorted(p.name for p in d.iterdir()) == sorted([f".out.tmp-{dead.pid}-c", ".out.tmp-someone-else",
                                                          f".out.tmp-{live}-d", f".out.tmp-{live}-e"])
