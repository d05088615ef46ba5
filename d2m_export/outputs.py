"""Atomic outputs: a crash or bad input never leaves a half-written artifact that looks complete.

Every directory d2m-export writes carries a marker file; an existing path without it is
somebody else's and is never overwritten.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from d2m_export._version import __version__
from d2m_export.errors import UserError

MARKER = ".d2m-export"
OWNER = ".d2m-export.pid"       # inside a temporary directory: the process writing it
GENERATOR = "d2m-export"


def check_output_dir(out: Path) -> None:
    """Refuse an existing path that is not an (empty) directory or one of ours."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} exists and is a file, not a d2m-export output directory; pick another path")
    if any(out.iterdir()) and not (out / MARKER).exists():
        raise UserError(f"--out {out} exists and was not written by d2m-export; pick another path or remove it")


def _started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch); None if there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:         # someone else's live process
        return 0.0


def _owner_line() -> str:
    return f"{os.getpid()} {_started(os.getpid())!r}\n"


def _writer_alive(path: Path) -> bool | None:
    """Whether the run that wrote a temporary of ours still runs; None if the temporary names no writer.
    The owner file gives its pid and start time, so that a pid the system has since given to another
    process (or thread) is not taken for the writer; without it, the pid in the name
    (`.NAME.tmp-PID-xxxx`, `.NAME.old-PID`) is all there is."""
    try:
        if (path / OWNER).is_file():
            fields = (path / OWNER).read_text().split()
            pid, when = int(fields[0]), float(fields[1]) if len(fields) > 1 else None
        else:
            pid, when = int(path.name.rsplit(".", 1)[1].split("-")[1]), None
    except (ValueError, IndexError, OSError):
        return None
    started = _started(pid)
    if started is None:
        return False
    return when is None or not started or abs(started - when) < 0.5


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Temporary siblings of `out` left by a killed run of ours (their writer is dead), removed: those
    with our owner file or completion marker. One killed before it wrote its owner file is empty, and
    only removed as such (rmdir); anything else, or one whose writer still runs, is left alone."""
    removed = []
    for path in list(out.parent.glob(f".{out.name}.tmp-*")) + list(out.parent.glob(f".{out.name}.old-*")):
        if _writer_alive(path) is not False:
            continue
        if (path / OWNER).is_file() or (path / MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                path.rmdir()            # fails unless empty: never someone else's files
            except OSError:
                continue
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_dir(out: Path):
    """Yield a temporary sibling directory; on success it replaces `out` in one rename. Temporaries
    that a killed earlier run left beside `out` are cleaned first."""
    out = Path(out)
    check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    (tmp / OWNER).write_text(_owner_line())
    try:
        yield tmp
        (tmp / OWNER).unlink(missing_ok=True)
        (tmp / MARKER).write_text(f"{GENERATOR} {__version__}\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def die_with_parent(parent: int) -> None:
    """Initializer of a worker process that writes into a temporary of ours: it dies with `parent`, the
    run that owns the temporary. Otherwise a SIGKILLed run leaves its worker writing on, and the next
    run's clean-up of that temporary races the orphan's files."""
    import signal
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
    else:
        import threading
        import time

        def watch():
            while os.getppid() == parent:
                time.sleep(0.1)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:            # the parent died before the line above took effect
        os._exit(1)


def check_output_file(path: Path) -> None:
    """A JSON output may replace only a JSON file that d2m-export wrote."""
    path = Path(path)
    if not path.exists():
        return
    if path.is_dir():
        raise UserError(f"--out {path} is a directory; give a file name such as results.json")
    try:
        ours = json.loads(path.read_text()).get("generator") == GENERATOR
    except (ValueError, UnicodeDecodeError, AttributeError):
        ours = False
    if not ours:
        raise UserError(f"--out {path} exists and was not written by d2m-export; pick another path or remove it")


def write_json(path: Path, payload: dict) -> None:
    """Write `payload` (tagged as ours) to `path` via a temporary file and one rename."""
    path = Path(path)
    check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"generator": GENERATOR, **payload}, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _checksum(path: Path) -> dict:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def file_checksums(root: Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} of every file under `root` except our markers and `skip`."""
    return {p.relative_to(root).as_posix(): _checksum(p) for p in sorted(Path(root).rglob("*"))
            if p.is_file() and p.name not in (MARKER, OWNER) and p.relative_to(root).as_posix() not in skip}


def verify_checksums(root: Path, recorded) -> None:
    """A one-line UserError unless every recorded file is there and unchanged. Runs before a runtime
    parses the files: a damaged file can crash a native parser outright."""
    if not isinstance(recorded, dict) or not all(isinstance(k, str) and isinstance(v, dict)
                                                 for k, v in recorded.items()):
        raise UserError(f"{root}/manifest.json has a malformed 'checksums' entry; export again")
    for rel, want in recorded.items():
        path = Path(root) / rel
        if not path.is_file() or Path(root).resolve() not in path.resolve().parents:
            raise UserError(f"{root}: {rel} is missing; export again")
        got = _checksum(path)
        if got != want:
            what = "size" if got["bytes"] != want.get("bytes") else "contents"
            raise UserError(f"{root}: {rel} is damaged (its {what} differ from those recorded at export); "
                            "export again")
