"""ExecuTorch target: export → run in executorch.runtime → greedy tokens identical to transformers (fp32).

Tiny random models: a 2-layer Llama, and LF-UC Qwen2MoE models (one dense layer, one MoE layer
with three routed experts, routers randomised so routing varies) at top-1 and top-2. Each MoE
program is also checked for its structure: one XNNPACK delegate per expert and the `cond` jumps
that select among them (a densely lowered program has no jumps and fails that check).
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("executorch")

from conftest import save_with_tokenizer, tiny_dense  # noqa: E402
from converters.base import export  # noqa: E402
from converters.parity import reference_greedy  # noqa: E402
from d2m_export.cli import main  # noqa: E402
from d2m_export.sources.models import load_model  # noqa: E402
from runtimes.base import load_runner  # noqa: E402

MAX_SEQ_LEN = 64
PROMPT = "Once upon a time, in a small village by the sea,"


def tiny_moe(top_k: int, seed: int = 0, num_experts: int | None = None):
    from d2m_export.methods import get_method
    from d2m_export.plan import Block, Options, Plan

    dense = tiny_dense("llama", seed=seed, num_hidden_layers=5)
    plan = Plan(method="lfuc", num_layers=5, blocks=[Block(host=1, donors=[2, 3, 4])],
                options=Options(host_mode="shared", top_k=top_k, router_init="zero",
                                num_experts=num_experts))
    model = get_method("lfuc").build(dense, plan)
    torch.manual_seed(seed + 1)
    with torch.no_grad():                      # a zero router picks one expert for every token
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)
    return model.eval()


def check_greedy(model_dir, export_dir, new_tokens=12):
    """The runtime's own greedy decoding reproduces transformers' tokens exactly."""
    model, tokenizer, _ = load_model(model_dir)
    ids = tokenizer(PROMPT)["input_ids"]
    ref, _ = reference_greedy(model, ids, new_tokens)
    with load_runner(export_dir, threads=2) as runner:
        got = runner.generate(ids, new_tokens)
        again = runner.generate(ids, new_tokens)     # a second sequence reuses the program's KV cache
    assert got == ref and again == ref
    return model, ids


def test_tiny_llama(tmp_path, tokenizer_dir):
    model_dir = save_with_tokenizer(tiny_dense("llama", num_hidden_layers=2), tmp_path / "llama", tokenizer_dir)
    out = tmp_path / "et"
    manifest = export("executorch", str(model_dir), "fp32", out, threads=2, new_tokens=16,
                      options={"max_seq_len": MAX_SEQ_LEN})
    p = manifest["parity"]
    assert p["greedy_match"] == p["greedy_total"] and p["max_abs_logit_err"] < 1e-3
    check_greedy(model_dir, out)
    methods = manifest["executorch"]["methods"]
    assert methods["get_max_seq_len"]["constant"] == MAX_SEQ_LEN
    assert methods["get_vocab_size"]["constant"] == 49152
    assert methods["use_kv_cache"]["constant"] is True
    assert methods["get_bos_id"]["constant"] == 1 and methods["get_eos_ids"]["constant"] == [2]
    assert methods["forward"]["delegates"]["XnnpackBackend"] >= 2
    assert "tokenizer.json" in manifest["tokenizer"] and (out / "model.pte").is_file()


def test_native_runtime_lines_stay_quiet_unless_verbose(tmp_path, tokenizer_dir):
    """As a user sees it: `generate` in its own process, stderr captured."""
    import subprocess
    import sys

    model_dir = save_with_tokenizer(tiny_dense("llama", num_hidden_layers=2), tmp_path / "llama", tokenizer_dir)
    out = tmp_path / "et"
    export("executorch", str(model_dir), "fp32", out, threads=2, new_tokens=8, options={"max_seq_len": MAX_SEQ_LEN})
    native = ("threadpool.cpp", "cpuinfo_utils.cpp")
    cmd = [sys.executable, "-m", "d2m_export.cli", "generate", str(out), "--prompt", "Hello", "--max-new-tokens", "4"]
    quiet = subprocess.run(cmd, capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stdout.startswith("Hello"), quiet.stderr[-2000:]
    assert not any(n in quiet.stderr for n in native), quiet.stderr[-2000:]
    verbose = subprocess.run(cmd[:3] + ["-v"] + cmd[3:], capture_output=True, text=True)
    assert verbose.returncode == 0 and "threadpool.cpp" in verbose.stderr


@pytest.mark.parametrize("top_k", [1, 2])
def test_tiny_lfuc_moe(tmp_path, tokenizer_dir, top_k):
    model = tiny_moe(top_k)
    model_dir = save_with_tokenizer(model, tmp_path / "moe", tokenizer_dir)
    out = tmp_path / "et"
    manifest = export("executorch", str(model_dir), "fp32", out, threads=2, new_tokens=16,
                      options={"max_seq_len": MAX_SEQ_LEN})
    p = manifest["parity"]
    assert p["greedy_match"] == p["greedy_total"] and p["max_abs_logit_err"] < 1e-3
    ref_model, ids = check_greedy(model_dir, out)

    # routing really varies over the prompt (else a wrong selection could go unnoticed)
    with torch.no_grad():
        logits = ref_model(torch.tensor([ids]), output_router_logits=True).router_logits
    chosen = {tuple(row) for layer in logits for row in layer.topk(top_k, -1).indices.sort(-1).values.tolist()}
    assert len(chosen) > 1

    et = manifest["executorch"]
    assert et["moe"]["lowering"] == "cond" and et["moe"]["top_k"] == top_k
    assert et["moe"]["distinct_experts_per_layer"] == [3]
    sparse = et["moe"]["structure"]
    assert sparse["sparse"], sparse
    # per MoE layer: the T == 1 cond, and k trees over 3 experts (2 conds each)
    assert sparse["conds"] == 1 + top_k * 2
    assert sparse["single_delegate_branches"] == sparse["decode_leaves_expected"] == top_k * 3
    # k·3 expert delegates in the decode trees and 3 in the prefill branch
    assert sparse["expert_call_sites"] == top_k * 3 + 3
    forward = et["methods"]["forward"]["instructions"]
    assert forward["JumpFalseCall"] == 2 * sparse["conds"]        # each cond: two jumps in the program
    assert forward["DelegateCall"] >= sparse["expert_call_sites"] + 2


def test_dense_lowering_fails_the_structure_check(tmp_path, tokenizer_dir):
    # 4 experts from 3 donors: one is replicated (stored once), as LF-UC does to fill N experts
    model_dir = save_with_tokenizer(tiny_moe(1, num_experts=4), tmp_path / "moe", tokenizer_dir)
    out = tmp_path / "et"
    manifest = export("executorch", str(model_dir), "fp32", out, threads=2, new_tokens=8,
                      options={"max_seq_len": MAX_SEQ_LEN, "moe_lowering": "dense"})
    assert manifest["parity"]["greedy_match"] == manifest["parity"]["greedy_total"]
    et = manifest["executorch"]
    assert "JumpFalseCall" not in et["methods"]["forward"]["instructions"]
    assert not et["moe"]["structure"]["sparse"]


def test_bad_input_exits_2_and_writes_nothing(tmp_path, tokenizer_dir, capsys):
    model_dir = save_with_tokenizer(tiny_dense("llama", num_hidden_layers=2), tmp_path / "llama", tokenizer_dir)
    out = tmp_path / "out" / "et"
    base = ["--target", "executorch", "--model", str(model_dir), "--out", str(out)]
    assert main(base + ["--quant", "q3_k"]) == 2
    assert main(base + ["--max-seq-len", "100000"]) == 2      # above the model's 256 positions
    assert main(base + ["--max-seq-len", "8"]) == 2
    assert main(base + ["--moe-lowering", "gather"]) == 2
    assert not out.exists() and not out.parent.exists()
    err = capsys.readouterr().err
    assert "q3_k" in err and "100000" in err and "gather" in err
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["model_type"] = "mixtral"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert main(base) == 2 and not out.exists()


def test_lowering_keeps_one_copy_of_the_weights_and_writes_the_same_program(tmp_path):
    """Inside `lowering_without_copies` the copy made for XNNPACK's preprocess shares the weights,
    constants go to files as they are made, and the program written is byte for byte the one
    ExecuTorch makes without it; afterwards ExecuTorch is as it was and the files are gone."""
    import io

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
    from executorch.exir import to_edge_transform_and_lower
    from executorch.exir._serialize._named_data_store import NamedDataStore

    from converters.executorch import lowering_without_copies

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256)).eval()
    example = (torch.randn(1, 256),)

    def lowered():
        program = torch.export.export(model, example)
        return program, to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()

    expected = lowered()[1].buffer
    add = NamedDataStore.add_named_data
    spill = tmp_path / "constants"
    with lowering_without_copies(spill):
        program, et = lowered()
        copied = XnnpackBackend.copy_exported_program_for_preprocess(program, [])
        assert copied is not program and copied.graph_module is not program.graph_module
        assert all(copied.state_dict[k].data_ptr() == v.data_ptr() for k, v in program.state_dict.items())
        assert len(list(spill.glob("*.bin"))) == 2      # the two weight matrices (512 KiB); the biases stay in memory
        written = io.BytesIO()
        et.write_to_file(written)
    assert written.getvalue() == expected
    assert not spill.exists()
    assert NamedDataStore.add_named_data is add and "copy_exported_program_for_preprocess" not in XnnpackBackend.__dict__
