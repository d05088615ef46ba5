"""Roofline arithmetic and device profiles."""
from __future__ import annotations

import pytest

from conftest import tiny_dense
from d2m_export.errors import UserError
from d2m_export.methods import get_method
from d2m_export.sources.params import param_counts
from d2m_export.plan import Block, Options, Plan
from d2m_export.devices.profiles import available, load_profile
from d2m_export.devices.roofline import decode_cost, kv_bytes_per_token, predicted_speedup


def test_decode_bytes_are_weights_plus_kv():
    cfg = tiny_dense("llama").config
    cost = decode_cost(cfg, "fp32", context=100)
    kv = 2 * 2 * 8 * 4 * 6          # k and v, 2 kv heads × head_dim 8, fp32, 6 layers
    assert kv_bytes_per_token(cfg) == kv
    assert cost.bytes == param_counts(cfg).active * 4 + kv * 100
    assert decode_cost(cfg, "q4_0", context=100).bytes < cost.bytes / 4


def test_fusion_predicts_a_speedup_from_bytes():
    dense = tiny_dense("llama", vocab_size=512)
    fused = get_method("lfuc").build(dense, Plan("lfuc", 6, [Block(1, [2, 3])], Options(host_mode="shared", router_init="zero")))
    s = predicted_speedup(dense.config, fused.config, "fp32", context=64)
    assert s == pytest.approx(decode_cost(dense.config, "fp32", 64).bytes / decode_cost(fused.config, "fp32", 64).bytes)
    assert s > 1.1


def test_memory_bound_at_batch_one():
    cfg = tiny_dense("llama").config
    prof = load_profile("raspberry-pi-5")
    cost = decode_cost(cfg, "fp32", 256)
    assert cost.bytes / (prof.memory_bandwidth_gbs * 1e9) > cost.flops / (prof.compute_gflops["fp32"] * 1e9)


def test_shipped_profiles_load():
    names = available()
    assert {"galaxy-s24-ultra", "pixel-8-pro", "iphone-15-pro", "raspberry-pi-5", "jetson-orin-nano",
            "macbook-air-m3"} <= set(names)
    for n in names:
        p = load_profile(n)
        assert p.memory_bandwidth_gbs > 0 and set(p.sources) >= {"memory_bandwidth_gbs", "compute_gflops"}


@pytest.mark.parametrize("text, needle", [
    ("name: x\ncompute_gflops: {fp32: 1, fp16: 1, int8: 1}\nusable_ram_gb: 1\nsources: {}\n", "memory_bandwidth_gbs"),
    ("name: x\nmemory_bandwidth_gbs: -3\ncompute_gflops: {fp32: 1, fp16: 1, int8: 1}\nusable_ram_gb: 1\nsources: {}\n",
     "positive"),
    ("name: x\nmemory_bandwidth_gbs: 3\ncompute_gflops: {fp32: 1}\nusable_ram_gb: 1\nsources: {}\n", "int8"),
])
def test_bad_profiles(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=needle):
        load_profile(path)


def test_profile_command_measures_this_host(tmp_path, capsys):
    from d2m_export.cli import main

    out = tmp_path / "host.yaml"
    assert main(["profile", "--threads", "1", "--out", str(out)]) == 0
    prof = load_profile(out)
    assert prof.memory_bandwidth_gbs > 0.5 and prof.compute_gflops["fp32"] > 1


def test_profile_calibrates_runtime_efficiency_from_a_real_export(tmp_path, tiny_model_dir):
    pytest.importorskip("onnxruntime")
    from d2m_export.cli import main
    from d2m_export.devices.probe import predicted_decode_ms

    export_dir = tmp_path / "onnx"
    assert main(["--target", "onnx", "--model", str(tiny_model_dir), "--out", str(export_dir)]) == 0
    out = tmp_path / "host.yaml"
    assert main(["profile", "--threads", "1", "--calibrate", str(export_dir), "--out", str(out)]) == 0
    prof = load_profile(out)
    eff = prof.runtime_efficiency["onnx:fp32"]
    assert 0 < eff < 5 and "onnx" in prof.sources["runtime_efficiency"]
    raw = {"memory_bandwidth_gbs": prof.memory_bandwidth_gbs, "compute_gflops": prof.compute_gflops}
    # calibrated prediction = roofline ÷ efficiency
    assert predicted_decode_ms(export_dir, raw, 96, eff) == pytest.approx(predicted_decode_ms(export_dir, raw, 96) / eff)
    # not an export: a clear error before anything is measured or written
    assert main(["profile", "--calibrate", str(tiny_model_dir), "--out", str(tmp_path / "h2.yaml")]) == 2
    assert not (tmp_path / "h2.yaml").exists()
    # a long prompt the export has no room for
    assert main(["profile", "--calibrate", str(export_dir), "--long-prompt-tokens", "100000",
                 "--out", str(tmp_path / "h3.yaml")]) == 2
    assert not (tmp_path / "h3.yaml").exists()


def test_two_context_calibration_recovers_both_efficiencies():
    from d2m_export.devices.probe import solve_efficiencies
    from d2m_export.devices.roofline import decode_cost

    cfg = tiny_dense("llama").config
    short, long = decode_cost(cfg, "fp32", 96), decode_cost(cfg, "fp32", 992)
    bw = 20e9
    t = lambda c: c.seconds(20, 1e9, efficiency=0.8, kv_efficiency=0.1)   # noqa: E731
    assert solve_efficiencies(short, t(short), long, t(long), bw) == pytest.approx((0.8, 0.1))
    assert t(long) - t(short) == pytest.approx((long.kv_bytes - short.kv_bytes) / bw / 0.1)
    assert solve_efficiencies(short, t(long), long, t(short), bw) is None   # long faster than short: no fit


# --- context as an axis of speed -------------------------------------------------------------------

def test_kv_bytes_grow_with_context_up_to_a_sliding_window():
    from d2m_export.devices.roofline import kv_positions_read

    cfg = tiny_dense("llama").config
    short, long = decode_cost(cfg, "fp32", 64), decode_cost(cfg, "fp32", 2048)
    assert long.bytes - short.bytes == long.kv_bytes - short.kv_bytes == kv_bytes_per_token(cfg) * (2048 - 64)
    assert long.flops > short.flops
    gemma = tiny_dense("gemma3_text").config        # five layers slide over 8 positions, the sixth reads all
    assert kv_positions_read(gemma, 4) == 6 * 4
    assert kv_positions_read(gemma, 2048) == 5 * 8 + 2048
    assert decode_cost(gemma, "fp32", 2048).kv_bytes == kv_bytes_per_token(gemma) / 6 * (5 * 8 + 2048)


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory, tokenizer_dir):
    """A tiny Llama (256 positions) exported to ONNX once, for the commands that time it."""
    from conftest import save_with_tokenizer
    from converters.base import export

    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("context")
    model_dir = save_with_tokenizer(tiny_dense("llama", num_hidden_layers=2), root / "llama", tokenizer_dir)
    export("onnx", str(model_dir), "fp32", root / "onnx", threads=1)
    return root / "onnx"


def decode_ab_main(argv):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("decode_ab", Path(__file__).parent.parent / "bench" / "decode_ab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in argv])


def test_bench_generate_and_decode_ab_at_a_context(onnx_export, tmp_path, capsys):
    import json

    from conftest import run_cli
    from runtimes.bench import interleaved

    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(capsys, "bench", onnx_export, "--context", 200, "--prompt-tokens", 200,
                                "--new-tokens", 8, "--repeats", 1, "--threads", 1, "--out", out)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["context"] == result["prompt_tokens"] == 200 and "context 200" in stdout
    assert result["runtime_settings"]["n_ctx"] == 216
    code, stdout, err = run_cli(capsys, "generate", onnx_export, "--prompt", "Once upon a time", "--context", 120,
                                "--max-new-tokens", 4, "--threads", 1)
    assert code == 0, err
    assert stdout.startswith("Once upon a time") and "at a context of 120 tokens" in err and "filler" in err
    code, _, err = run_cli(capsys, "generate", onnx_export, "--prompt", "Once upon a time", "--max-new-tokens", 4)
    assert code == 0 and "at a context of 4 tokens" in err and "filler" not in err     # the prompt alone
    ab = interleaved({"a": onnx_export, "b": onnx_export}, rounds=3, tokens=2, threads=1, context=100)
    assert ab["context"] == ab["prompt_tokens"] == 100
    assert decode_ab_main([onnx_export, "--rounds", 3, "--tokens", 2, "--threads", 1, "--context", 100,
                           "--out", tmp_path / "ab.md"]) == 0
    assert json.loads((tmp_path / "ab.json").read_text())["context"] == 100
    assert "context 100" in (tmp_path / "ab.md").read_text()


def test_a_context_beyond_the_export_or_not_positive_is_refused_before_any_work(onnx_export, tmp_path, capsys):
    import shutil

    from conftest import assert_user_error, run_cli

    damaged = tmp_path / "damaged"         # were the model loaded first, its checksum error would come first
    shutil.copytree(onnx_export, damaged)
    graph = next(damaged.glob("*.onnx"))
    graph.write_bytes(graph.read_bytes()[:100])
    out = tmp_path / "b.json"
    for flags, needles in [(["--context", 250], ["--context 250 plus 64", "256 positions"]),
                           (["--context", 0], ["--context", "at least 1"]),
                           (["--context", -3], ["--context"]),
                           (["--context", 64, "--prompt-tokens", 32],
                            ["--context 64 and --prompt-tokens 32 disagree"])]:
        code, stdout, err = run_cli(capsys, "bench", damaged, *flags, "--out", out)
        assert_user_error(code, err, *needles)
        assert not out.exists()
    for flags, needles in [(["--context", 300], ["--context 300 plus 64", "256 positions"]),
                           (["--context", 2], ["--context 2 is shorter than the prompt"]),
                           (["--context", 0], ["at least 1"])]:
        code, stdout, err = run_cli(capsys, "generate", damaged, "--prompt", "Once upon a time", *flags)
        assert_user_error(code, err, *needles)
        assert stdout == ""
    for flags in (["--context", 300], ["--context", 64, "--prompt-tokens", 32]):
        assert decode_ab_main([damaged, *flags, "--out", tmp_path / "ab.md"]) == 2
        assert_user_error(2, capsys.readouterr().err, "--context")
    with pytest.raises(SystemExit) as e:
        decode_ab_main([damaged, "--context", 0])
    assert e.value.code == 2 and "--context must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "ab.md").exists()
