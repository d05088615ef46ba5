"""Shared fixtures: tiny random Llama/Qwen2/Qwen3/Gemma 3 models saved as Hugging Face folders."""
from __future__ import annotations

import pytest
import torch

# Tiny layers under a real 49k vocabulary: the LM head dominates the active parameters.
TINY = dict(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5)


# Gemma 3's extras, small enough to matter in short tests: an 8-token sliding window on every layer but the
# sixth (Gemma 3's own pattern), a query scale that is not 1/√head_dim, and a local RoPE base of its own.
TINY_GEMMA3 = dict(head_dim=8, query_pre_attn_scalar=12, sliding_window=8,
                   layer_types=["sliding_attention"] * 5 + ["full_attention"],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})


def tiny_dense(arch: str = "llama", seed: int = 0, **overrides):
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed(seed)
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                          "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                          "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM)}[arch]
    extra = TINY_GEMMA3 if arch == "gemma3_text" else {}
    model = model_cls(cfg_cls(**{**TINY, **extra, **overrides})).eval()
    with torch.no_grad():   # non-trivial norm weights, so that γ folding is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:  # biases
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module", autouse=True)
def free_module_disk(request, tmp_path_factory, tokenizer_dir, converted):
    """Remove what a test module wrote under pytest's temporary folder once the module is done, unless one
    of its tests failed: the suite exports many models, and keeping all of them can fill a CI disk.
    (tmp_path_retention_policy = "failed" does the same for each passing test's own tmp_path.) The session's
    folders (`tokenizer_dir`, `converted`) are made before it looks, and so kept."""
    import shutil

    base = tmp_path_factory.getbasetemp()
    before, failed = set(base.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The embedded SmolLM2 tokenizer, saved once (tiny models share its vocabulary)."""
    from transformers import AutoTokenizer

    from d2m_export.sources.models import EMBEDDED
    import importlib.util
    from pathlib import Path

    package, filename = EMBEDDED["smollm2-135m"]
    gguf_dir = Path(list(importlib.util.find_spec(package).submodule_search_locations)[0])
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename).save_pretrained(out)
    return out


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model_dir(request, tmp_path, tokenizer_dir):
    import shutil

    model = tiny_dense(request.param)
    out = tmp_path / f"tiny-{request.param}"
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def save_with_tokenizer(model, path, tokenizer_dir):
    """A model folder as exporters take it: weights, config and the shared tokenizer files."""
    import shutil

    model.save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def family_workspace(root, arch: str, tokenizer_dir) -> dict:
    """A tiny dense model of `arch` in `root`, with a plan (host 1 fuses layers 2 and 3) and a training
    corpus beside it, as the per-family tests take them."""
    (root / "plan.yaml").write_text("blocks:\n  - {host: 1, donors: [2, 3]}\n")
    write_tiny_corpus(root / "corpus.txt")
    return {"dense": save_with_tokenizer(tiny_dense(arch), root / "dense", tokenizer_dir), "root": root}


def write_tiny_corpus(path):
    """A small training text file (`train --corpus`) that tokenizes in no time."""
    path.write_text(" ".join(f"The {w} sat on the mat by the door." for w in range(400)))
    return path


def cli_argv(*argv) -> list[str]:
    """`d2m-export argv...` as a subprocess command line."""
    import sys

    return [sys.executable, "-m", "d2m_export.cli", *map(str, argv)]


def train_log(out) -> list[dict]:
    """The rows of a training run's train_log.jsonl."""
    import json

    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def kill_at_checkpoint(cmd, out, step: int, env=None) -> None:
    """Start `cmd` (a training run writing into `out`) and SIGKILL it, launcher and workers alike,
    as soon as its step-`step` checkpoint is complete."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / f"step-{step:06d}" / "trainer.json").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of `d2m-export argv...` run in-process."""
    from d2m_export.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code, err, *needles):
    """Bad input: exit 2 and one `d2m-export: error:` line that names each needle."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("d2m-export: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


def export_with_cli(capsys, target, model_dir, out, quant=None):
    """`d2m-export --target T ...`, which must succeed; its manifest."""
    import json

    code, _, err = run_cli(capsys, "--target", target, "--model", model_dir, *(["--quant", quant] if quant else []),
                           "--threads", 2, "--out", out)
    assert code == 0, err
    return json.loads((out / "manifest.json").read_text())


# Property-based tests: a small budget by default (CI), `--hypothesis-profile long` for a longer local run
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", max_examples=100, derandomize=True, print_blob=True)
_hypothesis_settings.register_profile("long", max_examples=1000, print_blob=True)
_hypothesis_settings.load_profile("ci")


# What `convert` writes, made by running it (issue 36): its default options on tiny dense models, then each
# method and option that gives another layout. The dense MLPs are wide beside the 49k-token LM head so that
# the default active ratio (0.8) is reachable; a shared host or top-2 keeps more weights active, and its best on
# six tiny layers is 0.854. {layout: (source: a dense architecture or another layout, convert's flags)}
CONVERT_DENSE = dict(intermediate_size=2048)
CONVERTED_LAYOUTS = {
    "lfuc": ("llama", []),           # the defaults: routed host, top-1 (Qwen2-MoE, a width-0 shared expert)
    "lfuc-qwen2": ("qwen2", []),
    "lfuc-qwen3": ("qwen3", []),     # Qwen3-MoE (no shared expert)
    "lfuc-bf16": ("llama-bf16", []),  # a bf16 source, as SmolLM2 is: bf16 out
    "lfuc-shared": ("llama", ["--host-mode", "shared", "--target-active-ratio", "0.9"]),
    "lfuc-top2": ("llama", ["--top-k", "2", "--target-active-ratio", "0.9"]),
    "prune": ("llama", ["--method", "prune"]),
    "upcycle": ("llama", ["--method", "upcycle"]),
    "moe2dense": ("lfuc", ["--method", "moe2dense", "--experts-kept", "1"]),
}
# convert heals by default; its default budget takes minutes on these models, this one seconds
CONVERT_HEAL_BUDGET = ["--heal-tokens", "512", "--heal-steps", "2"]


@pytest.fixture(scope="session")
def converted(tmp_path_factory, tokenizer_dir):
    """converted(layout) -> the folder `convert` wrote for CONVERTED_LAYOUTS[layout], made on first use."""
    from d2m_export.cli import main

    root = tmp_path_factory.mktemp("converted")
    made = {}

    def make(layout: str):
        if layout in made:
            return made[layout]
        if layout not in CONVERTED_LAYOUTS:      # a dense source: llama, qwen2, qwen3, llama-bf16
            arch, _, dtype = layout.partition("-")
            model = tiny_dense(arch, **CONVERT_DENSE)
            made[layout] = save_with_tokenizer(model.to(torch.bfloat16) if dtype else model, root / layout,
                                               tokenizer_dir)
            return made[layout]
        source, flags = CONVERTED_LAYOUTS[layout]
        budget = [] if "moe2dense" in flags else CONVERT_HEAL_BUDGET
        code = main(["convert", "--model", str(make(source)), *flags, *budget, "--out", str(root / layout)])
        assert code == 0, f"convert {layout} failed"
        made[layout] = root / layout
        return made[layout]

    return make


def same_weights_layout(trained, source) -> None:
    """`trained` stores the tensors `source` stores, with the same shapes and dtypes (zero-element ones too)."""
    from safetensors import safe_open

    def layout(folder):
        with safe_open(folder / "model.safetensors", framework="pt") as f:
            return {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}

    assert layout(trained) == layout(source)


# `make test` runs every stage and target at tiny size; `make test-all` (CI) adds the tests below, marked `full`
# here: whole matrices of variants beyond one per stage and target, the property-based suite, the subprocess
# kill and full-disk tests, and the slowest exports (ExecuTorch's lowering takes a minute a model). A node id
# starting with an entry is `full`; seconds measured in one `make test-all` run are what chose them.
FULL_ONLY = (
    "test_properties.py", "test_properties_flags.py", "test_full_disk.py",
    "test_web_page.py::test_smollm2_lfuc",
    *(f"test_converted_layouts.py::test_exports_with_exact_parity[{layout}-" for layout in
      ("lfuc-qwen2", "lfuc-qwen3", "lfuc-bf16", "lfuc-shared", "lfuc-top2", "prune", "upcycle", "moe2dense")),
    *(f"test_converted_layouts.py::test_moe_to_dense[{layout}]" for layout in
      ("lfuc-qwen2", "lfuc-qwen3", "lfuc-bf16", "lfuc-shared", "lfuc-top2", "upcycle")),
    *(f"test_crash_safety.py::test_sigkill_leaves_nothing_complete_and_the_next_run_cleans_up[{stage}]"
      for stage in ("convert", "executorch", "coreml", "heal")),
    "test_scale.py::test_a_bf16_conversion_exports_exactly[executorch-fp32]", "test_scale.py::test_dtype_flag_writes",
    "test_llama32.py::test_fp32_export_matches_transformers[executorch-",
    "test_cli.py::test_convert_by_ratio_writes_loadable_checkpoint",
    "test_moe2dense.py::test_round_trip_lfuc_cpt_moe2dense_exports_to_every_target",
    "test_gemma3.py::test_exports_match_transformers[executorch-", "test_gemma3.py::test_exports_match_transformers[coreml-",
    "test_executorch.py::test_tiny_lfuc_moe[2]", "test_executorch.py::test_native_runtime_lines_stay_quiet_unless_verbose",
    "test_families.py::test_exports_match_transformers[executorch-", "test_families.py::test_exports_match_transformers[coreml-",
    "test_families.py::test_convert[lfuc-flags0-qwen3_moe]",
    *(f"test_families.py::test_family_exports_match_transformers[{family}-{export}]" for family in ("mistral", "granite")
      for export in ("executorch-lfuc", "coreml-lfuc", "gguf-dense")),
    "test_heal_cli.py::test_healed_model_exports_with_parity[executorch-",
    "test_train_bf16.py::test_bf16_sigkill_then_resume_matches_uninterrupted",
    "test_shards.py::test_sigkill_then_resume_from_shards_matches_uninterrupted",
    "test_shards.py::test_training_from_shards_keeps_memory_flat_when_the_corpus_grows_tenfold",
    "test_model_sources.py::test_gguf_file_as_model_is_dequantized_once_and_equals_the_folder",
    *(f"test_gguf.py::test_f32_matches_transformers_greedy[{v}]" for v in
      ("qwen2", "qwen3", "lfuc-shared-k1", "lfuc-shared-k2-qwen2", "lfuc-shared-k2-qwen3", "lfuc-routed-k2")),
    *(f"test_gguf.py::test_k_quants_come_from_llama_cpp_quantizer_and_meet_their_floor[{v}]" for v in
      ("llama-q5_k_m-17-Q5_K", "llama-q4_k_m-15-Q4_K", "lfuc-q6_k-18-Q6_K", "llama-q6_k-18-Q6_K", "lfuc-q5_k_m-17-Q5_K")),
    # the default LF-UC layout's variants stay in `make test`; these repeat them on other layouts or precisions
    "test_fsdp.py::test_sigkill_then_resume_on_two_and_on_one_process[dense]",
    "test_fsdp.py::test_two_fsdp_processes_match_one[dense]",
    "test_heal.py::test_closed_form_lowers_held_out_block_error[llama-lfuc-shared]",
    "test_heal.py::test_closed_form_lowers_held_out_block_error[qwen2-lfuc-shared]",
    "test_scale.py::test_a_bf16_conversion_exports_exactly[gguf-f32]", "test_scale.py::test_bf16_calibration_agrees_with_fp32",
    "test_gemma3.py::test_embedded_gemma3_perplexity_is_what_the_model_gives_with_bos",
    "test_executorch.py::test_dense_lowering_fails_the_structure_check",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        node = item.nodeid.split("/")[-1]
        if node.startswith(FULL_ONLY):
            item.add_marker(pytest.mark.full)
