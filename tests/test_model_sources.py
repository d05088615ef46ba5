"""`--model` as a .gguf file and as a Hub id (from a Hugging Face cache laid out here; no network)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_user_error, export_with_cli, run_cli, save_with_tokenizer, tiny_dense

pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer_dir):
    return save_with_tokenizer(tiny_dense("llama"), tmp_path_factory.mktemp("src") / "tiny-llama", tokenizer_dir)


def perplexity(capsys, model, out: Path) -> float:
    code, _, err = run_cli(capsys, "eval", "--model", model, "--tasks", "none", "--ppl-tokens", 1024, "--out", out)
    assert code == 0, err
    return json.loads(out.read_text())["perplexity"]["value"]


def test_gguf_file_as_model_is_dequantized_once_and_equals_the_folder(capsys, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("D2M_CACHE", str(tmp_path / "cache"))
    manifest = export_with_cli(capsys, "gguf", tiny_llama, tmp_path / "g")          # f32: the weights exactly
    path = tmp_path / "g" / manifest["files"][0]
    assert perplexity(capsys, path, tmp_path / "a.json") == pytest.approx(perplexity(capsys, tiny_llama, tmp_path / "b.json"),
                                                                          rel=1e-4)
    cached = list((tmp_path / "cache" / "models" / "gguf").iterdir())
    assert len(cached) == 1 and (cached[0] / "config.json").is_file()
    stamp = (cached[0] / "config.json").stat().st_mtime_ns
    export_with_cli(capsys, "onnx", path, tmp_path / "o")        # another command: the same cached copy
    assert (cached[0] / "config.json").stat().st_mtime_ns == stamp


def test_gguf_of_another_family_or_not_gguf_exits_2(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("D2M_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(other, "gpt2")
    w.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 4), "float32"))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    code, _, err = run_cli(capsys, "eval", "--model", other, "--tasks", "none", "--out", tmp_path / "e.json")
    assert_user_error(code, err, "'gpt2' is not supported", "llama", "qwen2")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    code, _, err = run_cli(capsys, "eval", "--model", junk, "--tasks", "none", "--out", tmp_path / "e.json")
    assert_user_error(code, err, "junk.gguf", "not a readable GGUF file")
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "cache" / "models").exists()


def hub_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """A Hugging Face hub cache holding `folder` as the main revision of `repo_id` (huggingface_hub's layout)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def cli(*argv, env: dict) -> subprocess.CompletedProcess:
    """The CLI in its own process: huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when it is imported."""
    return subprocess.run([sys.executable, "-m", "d2m_export.cli", *map(str, argv)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **env}, timeout=900)


def test_hub_id_resolves_through_the_offline_cache(tiny_llama, tmp_path):
    snapshot = hub_cache(tmp_path / "hf", "someorg/tiny-llama", tiny_llama)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "D2M_CACHE": str(tmp_path / "cache")}
    res = cli("eval", "--model", "someorg/tiny-llama", "--tasks", "none", "--ppl-tokens", 1024,
              "--out", tmp_path / "hub.json", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    res2 = cli("eval", "--model", snapshot, "--tasks", "none", "--ppl-tokens", 1024, "--out", tmp_path / "dir.json", env=env)
    assert res2.returncode == 0, res2.stderr[-2000:]
    hub, folder = (json.loads((tmp_path / f).read_text()) for f in ("hub.json", "dir.json"))
    assert hub["perplexity"]["value"] == folder["perplexity"]["value"]
    assert hub["model"] == "someorg/tiny-llama"

    res = cli("--target", "onnx", "--model", "someorg/tiny-llama", "--out", tmp_path / "onnx", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "onnx" / "manifest.json").read_text())["model"] == "someorg/tiny-llama"


def test_hub_id_not_cached_offline_exits_2_naming_it(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "D2M_CACHE": str(tmp_path / "cache")}
    res = cli("eval", "--model", "someorg/not-cached", "--tasks", "none", "--out", tmp_path / "e.json", env=env)
    lines = [line for line in res.stderr.strip().splitlines() if line.startswith("d2m-export: error:")]
    assert res.returncode == 2 and len(lines) == 1 and "'someorg/not-cached'" in lines[0] and "cache" in lines[0]
    assert "Traceback" not in res.stderr and not (tmp_path / "e.json").exists()
