"""The VRAM estimator on real shapes (synthetic GGUFs: real tensor shapes, sparse zero weights), checked against
llama.cpp's own buffer sizes and the NVML measurements committed from the GPU run (results/vram/)."""

import json
import subprocess
import sys

import pytest

from model_orchestrator.files.estimate import estimate_headers, estimate_shape, shape_from_header
from model_orchestrator.files.gguf_header import read_header, read_model_headers
from support.helpers import ROOT, bench_module

write_synthetic = bench_module("synthetic_gguf").write_synthetic

MEASURED = json.loads((ROOT / "results/vram/run2-uncalibrated.json").read_text())["rows"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic")
    return {s: shape_from_header(read_header(write_synthetic(d / f"{s}.gguf", s)))
            for s in ("llama-1b", "llama-8b", "qwen3-30b-a3b")}


@pytest.mark.parametrize("row", MEASURED, ids=lambda r: f"{r['shape']}-{r['ctx']}-{r['cache']}")
def test_within_5_percent_of_nvml_and_exact_on_llama_cpp_buffers(shapes, row):
    est = estimate_shape(shapes[row["shape"]], n_ctx=row["ctx"], n_gpu_layers=99, cache_type=row["cache"])
    assert abs(est.total_mb - row["measured_mib"]) / row["measured_mib"] < 0.05, (est.total_mb, row["measured_mib"])
    assert est.weights_mb == pytest.approx(row["llama_buffers_mib"]["model"], abs=0.5)  # what llama.cpp allocated
    assert est.kv_cache_mb == pytest.approx(row["llama_buffers_mib"]["KV"], abs=0.5)


CALIBRATED = [r for f in ("table.json", "heldout.json")
              for r in json.loads((ROOT / "results/vram" / f).read_text())["rows"]]


def _cuda0_compute_mib(row: dict) -> float:
    """The GPU's compute buffer as llama.cpp logged it (sched_reserve: CUDA0 compute buffer size = X MiB)."""
    line = next(line for line in row["log_memory"] if "CUDA0 compute buffer size" in line)
    return float(line.split("=")[1].split()[0])


@pytest.mark.parametrize("row", CALIBRATED, ids=lambda r: f"{r['shape']}-{r['ctx']}-{r['cache']}")
def test_every_cache_type_within_half_a_percent_or_32_mib_of_nvml(shapes, row):
    """The H200 measurements (3 shapes x 5 contexts x f16, q8_0, q4_0): the whole estimate against NVML, and its
    compute buffer against the one llama.cpp logged for the GPU (a quantized cache used to be 20-66 MiB high: its f16
    copies for flash attention were added to the FFN peak instead of replacing it when larger)."""
    from model_orchestrator.files.estimate import CALIBRATION

    est = estimate_shape(shapes[row["shape"]], n_ctx=row["ctx"], n_gpu_layers=99, cache_type=row["cache"])
    error = est.total_mb - row["measured_mib"]
    assert abs(error) <= max(0.005 * row["measured_mib"], 32), (est.total_mb, row["measured_mib"])
    pool = CALIBRATION["moe_pool_mib"] if est.details["experts"] else 0.0
    assert est.compute_mb - pool == pytest.approx(_cuda0_compute_mib(row), abs=4.5)


# (shape, context, K cache, V cache, flash attention) -> the GPU compute buffer in MiB, without the MoE pool: the
# buffer llama.cpp b11434 logs on the H200 for the measured rows; the others follow its rule (max of the FFN peak and
# the attention peak with the f16 copies of whatever is quantized, plus the mask)
COMPUTE_CASES = [
    ("llama-8b", 8192, "f16", "f16", True, 124.0),  # FFN peak 116 + mask 8
    ("llama-8b", 32768, "q8_0", "q8_0", True, 200.0),  # attention 40 + K,V f16 copies 128 + mask 32
    ("llama-8b", 16384, "q4_0", "q4_0", True, 132.0),  # FFN peak 116 + mask 16 > attention 40 + 64 + 16
    ("llama-8b", 32768, "f16", "q8_0", True, 148.0),  # only V is copied: 40 + 64 + 32 < 116 + 32
    ("llama-8b", 131072, "f16", "q8_0", True, 424.0),  # 40 + 256 + 128
    ("llama-1b", 131072, "q8_0", "q8_0", True, 404.0),
    ("qwen3-30b-a3b", 65536, "q4_0", "q4_0", True, 248.0),  # llama.cpp logged 252 (4 MiB more live below)
    ("llama-8b", 8192, "f16", "f16", False, 116.0 + 8192 * 512 * 4 * 33 / 2**20),  # no FA: f32 mask, every head's KQ
]


@pytest.mark.parametrize("shape, ctx, cache_k, cache_v, flash_attn, expected", COMPUTE_CASES)
def test_compute_buffer_follows_llama_cpps_reservation(shapes, shape, ctx, cache_k, cache_v, flash_attn, expected):
    from model_orchestrator.files.estimate import CALIBRATION

    est = estimate_shape(shapes[shape], n_ctx=ctx, n_gpu_layers=99, cache_type=cache_k, cache_type_v=cache_v,
                         flash_attn=flash_attn)
    pool = CALIBRATION["moe_pool_mib"] if est.details["experts"] else 0.0
    assert est.compute_mb - pool == pytest.approx(expected, abs=0.1)


def test_layer_placement_follows_n_gpu_layers(shapes):
    s = shapes["llama-8b"]  # 32 blocks + output
    full = estimate_shape(s, n_ctx=8192, n_gpu_layers=99)
    none = estimate_shape(s, n_ctx=8192, n_gpu_layers=0)
    output_only = estimate_shape(s, n_ctx=8192, n_gpu_layers=1)
    half = estimate_shape(s, n_ctx=8192, n_gpu_layers=17)  # 16 blocks + output
    assert none.total_mb == 0 and none.layers_on_gpu == 0
    assert output_only.kv_cache_mb == 0 and output_only.weights_mb == pytest.approx(
        (s.tensors["output.weight"] + s.tensors["output_norm.weight"]) / 2**20)
    assert half.layers_on_gpu == 17 and half.kv_cache_mb == pytest.approx(full.kv_cache_mb / 2)
    block = sum(v for k, v in s.tensors.items() if k.startswith("blk.0.")) / 2**20
    assert half.weights_mb == pytest.approx(output_only.weights_mb + 16 * block)


def test_tied_embedding_is_copied_to_the_gpu_with_the_output_layer(shapes):
    s = shapes["llama-1b"]
    assert s.tied_output
    est = estimate_shape(s, n_ctx=8192, n_gpu_layers=99)
    blocks = sum(v for k, v in s.tensors.items() if k.startswith("blk.")) / 2**20
    output = (s.tensors["token_embd.weight"] + s.tensors["output_norm.weight"]) / 2**20
    assert est.weights_mb == pytest.approx(blocks + output)


def test_tensor_overrides_keep_experts_on_the_host(shapes):
    s = shapes["qwen3-30b-a3b"]
    full = estimate_shape(s, n_ctx=8192, n_gpu_layers=99)
    experts = sum(v for k, v in s.tensors.items() if "_exps" in k) / 2**20
    for args in (["-ot", r"ffn_.*_exps\.=CPU"], ["--cpu-moe"]):
        on_host = estimate_shape(s, n_ctx=8192, n_gpu_layers=99, extra_args=args)
        assert on_host.weights_mb == pytest.approx(full.weights_mb - experts)
    ten = estimate_shape(s, n_ctx=8192, n_gpu_layers=99, extra_args=["--n-cpu-moe", "10"])
    assert ten.weights_mb == pytest.approx(full.weights_mb - experts * 10 / 48)


def test_kv_cache_scales_with_context_and_cache_type(shapes):
    s = shapes["qwen3-30b-a3b"]  # 48 layers x 4 KV heads x 128 dims x (K + V)
    assert estimate_shape(s, n_ctx=131072, n_gpu_layers=99).kv_cache_mb == 48 * 4 * 128 * 2 * 2 * 131072 / 2**20
    q8 = estimate_shape(s, n_ctx=131072, n_gpu_layers=99, cache_type="q8_0")
    assert q8.kv_cache_mb == pytest.approx(12288 * 34 / 64)
    assert estimate_shape(s, n_ctx=1000, n_gpu_layers=99).context_cells == 1024  # padded like llama.cpp


def test_sliding_window_layers_keep_only_their_window(shapes):
    import dataclasses

    s = dataclasses.replace(shapes["llama-8b"], n_swa=4096, swa_layers=[i % 2 == 0 for i in range(32)])
    full = estimate_shape(shapes["llama-8b"], n_ctx=131072, n_gpu_layers=99).kv_cache_mb
    swa = estimate_shape(s, n_ctx=131072, n_gpu_layers=99).kv_cache_mb
    assert swa == pytest.approx(full / 2 + full / 2 * (4096 + 512) / 131072)


def test_estimate_command(shapes, tmp_path):
    path = write_synthetic(tmp_path / "m.gguf", "llama-8b")
    out = subprocess.run([sys.executable, "-m", "model_orchestrator", "estimate", str(path), "--ctx", "32768",
                          "--cache-type", "q8_0", "--json"], capture_output=True, text=True, timeout=60, check=True)
    body = json.loads(out.stdout)
    est = estimate_headers(read_model_headers(path), n_ctx=32768, n_gpu_layers=99, cache_type="q8_0")
    assert body["total_mb"] == pytest.approx(est.total_mb, abs=0.1)
    assert body["kv_cache_mb"] == 2176.0
    text = subprocess.run([sys.executable, "-m", "model_orchestrator", "estimate", str(path)], capture_output=True,
                          text=True, timeout=60).stdout
    assert "KV cache" in text and "total" in text


def test_fast_header_reader_agrees_with_gguf_py(tmp_path):
    """gguf_header.py replaces gguf-py's reader for speed; on every file kind we make they must agree."""
    from gguf import GGUFReader

    from support.tiny_models import write_tiny_mmproj, write_tiny_model

    files = [write_tiny_model(tmp_path / f"{a}.gguf", arch=a) for a in ("llama", "qwen3", "qwen3moe")]
    files += [write_tiny_mmproj(tmp_path / "mmproj.gguf"), write_synthetic(tmp_path / "s.gguf", "qwen3-30b-a3b")]
    for f in files:
        ours, theirs = read_header(f), GGUFReader(str(f))
        assert [(t.name, t.n_bytes) for t in ours.tensors] == [(t.name, int(t.n_bytes)) for t in theirs.tensors]
        assert set(ours.fields) == set(theirs.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
        for key in ("clip.vision.block_count", "llama.block_count", "qwen3.embedding_length", "qwen3moe.expert_count"):
            if key in theirs.fields:
                assert ours.fields[key] == theirs.fields[key].parts[-1][0], key
    with pytest.raises(ValueError, match="not a GGUF"):
        read_header(ROOT / "README.md")
