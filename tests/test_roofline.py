"""Roofline arithmetic and device profiles."""
from __future__ import annotations

import pytest

from conftest import tiny_dense
from d2m_export.errors import UserError
from d2m_export.methods import get_method
from d2m_export.params import param_counts
from d2m_export.plan import Block, Options, Plan
from d2m_export.profiles import available, load_profile
from d2m_export.roofline import decode_cost, kv_bytes_per_token, predicted_speedup


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
    from d2m_export.probe import predicted_decode_ms

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
    from d2m_export.probe import solve_efficiencies
    from d2m_export.roofline import decode_cost

    cfg = tiny_dense("llama").config
    short, long = decode_cost(cfg, "fp32", 96), decode_cost(cfg, "fp32", 992)
    bw = 20e9
    t = lambda c: c.seconds(20, 1e9, efficiency=0.8, kv_efficiency=0.1)   # noqa: E731
    assert solve_efficiencies(short, t(short), long, t(long), bw) == pytest.approx((0.8, 0.1))
    assert t(long) - t(short) == pytest.approx((long.kv_bytes - short.kv_bytes) / bw / 0.1)
    assert solve_efficiencies(short, t(long), long, t(short), bw) is None   # long faster than short: no fit
