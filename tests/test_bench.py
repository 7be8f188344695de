"""The benchmark harness on a CPU at tiny size: it runs end to end and writes what it promises, its FLOP
counts match DESIGN.md and PyTorch's own counter, and the regression gate flags what it should.

No test asserts a time: timings on a shared CPU say nothing, and a timed unit test is not a benchmark.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from k4trt.bench import compare, flash_attn_shim, flops, harness, models, settings
from k4trt.cli.main import main as k4trt_main
from k4trt.config import RELEASED_DIT, TEXT_TOKENS
from k4trt.errors import K4TRTError
from k4trt.models.dit import build_rope, explicit_attention

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are all thread synchronisation: one thread runs them many times faster, and a busy
    machine cannot stall them. Restored afterwards for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_dit_step_flops_match_design_budget():
    """DESIGN.md: 241.8 TFLOP of Linear + 333.6 TFLOP of attention = 575 TFLOP per step at 12 s 672x384."""
    step = flops.dit_step_flops(RELEASED_DIT, 25, 384 // 8, 672 // 8)
    assert step.tokens == 25 * 24 * 42 + 224 == 25_424
    assert step.linear == pytest.approx(241.8e12, rel=1e-3)
    assert step.attention == pytest.approx(333.6e12, rel=1e-3)
    assert step.total == pytest.approx(575e12, rel=1e-3)
    assert step.floor_s() == pytest.approx(575e12 / 798e12, rel=1e-3)


def test_dit_step_flops_equal_pytorch_flop_counter():
    """The written-out formula counts exactly the matmuls the DiT runs (attention in its explicit form,
    which the counter sees as two batched matmuls)."""
    cfg = models.TINY_DIT
    t, h, w = 3, 8, 6
    dit = models.random_dit(cfg, torch.device("cpu"), torch.float32).with_attention(explicit_attention)
    inputs = (torch.randn(t, h, w, cfg.in_visual_dim), torch.randn(TEXT_TOKENS, cfg.in_text_dim),
              torch.tensor([999.0]), build_rope(cfg, t, h, w, torch.float32))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dit(*inputs)
    assert counter.get_total_flops() == flops.dit_step_flops(cfg, t, h, w).total


def test_roofline_reads_against_the_peak():
    r = flops.roofline(798e12, 2.0)
    assert r["achieved_tflops"] == pytest.approx(399.0)
    assert r["percent_of_peak"] == pytest.approx(50.0)
    assert r["floor_s"] == pytest.approx(1.0)
    assert r["times_floor"] == pytest.approx(2.0)


def _read_outputs(out):
    doc = json.loads((out / "result.json").read_text())
    png = (out / "stages.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    return doc, (out / "result.md").read_text()


def test_tiny_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    code = k4trt_main(["bench", "--tiny", "--device", "cpu", "--backends", "torch,trt-fp8,torch-graph", "--repeat", "2",
                       "--out", str(out)])
    assert code == 0
    doc, md = _read_outputs(out)
    for key in ("device", "commit", "date", "settings", "software", "timer", "flops", "summary", "backends"):
        assert key in doc
    assert doc["device"]["kind"] == "cpu" and doc["timer"] == "wall clock + synchronize"
    assert doc["settings"]["weights"] == "tiny random" and doc["settings"]["repeat"] == 2

    torch_result = doc["backends"]["torch"]
    assert torch_result["status"] == "ok"
    stages = ["text encoder", "prep", "dit step 1", "dit step 2", "dit step 3", "dit step 4", "vae decode", "total"]
    assert list(torch_result["samples"]) == stages
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in torch_result["samples"].values())
    assert set(torch_result["summary"]) == set(stages) | {"dit"}
    cell = torch_result["summary"]["total"]
    assert cell["min_s"] <= cell["median_s"] <= cell["max_s"] and cell["n"] == 2
    assert set(torch_result["roofline"]) == {"dit_step", "vae_decode"}
    assert torch_result["memory"] is None  # CPU: no GPU memory to report

    for name in ("trt-fp8", "torch-graph"):  # not possible here: reported, with the reason, never faked
        assert doc["backends"][name]["status"] == "skipped"
        assert "CUDA GPU" in doc["backends"][name]["reason"]
        assert "samples" not in doc["backends"][name]
    assert doc["summary"]["torch"]["status"] == "ok"

    assert "| stage | torch |" in md and "| **total** |" in md and "x floor" in md
    assert "trt-fp8** skipped" in md and settings.DEFAULT_PROMPT not in md
    assert "| stage |" in capsys.readouterr().out


def test_weights_folder_run(tiny_weights, tmp_path):
    """--weights loads through the product's loaders (TextEncoder with its tokenizer, TorchExecutor)."""
    out = tmp_path / "out"
    assert k4trt_main(["bench", "--weights", str(tiny_weights), "--device", "cpu", "--backends", "torch", "--size", "64x32",
                       "--duration", "0", "--repeat", "1", "--out", str(out)]) == 0
    doc, md = _read_outputs(out)
    assert doc["settings"]["weights"] == str(tiny_weights)
    assert doc["backends"]["torch"]["status"] == "ok"
    assert "random weights" not in md


def test_generation_stages_and_graph_loop_reading():
    """A run is `Pipeline.generate` with the harness's recorder. On the CPU CUDA graphs run eagerly, so the
    steps are separate stages; on a GPU the graphed loop is one "dit" stage, read as four equal steps."""
    from k4trt.bench.subjects import _Generation
    from k4trt.runtime.torch_executor import TorchExecutor

    s = settings.resolve(backends="torch", size=None, duration=None, device="cpu", weights=None, engines=None,
                         original=None, tiny=True, warmup=1, repeat=1, prompt="x", seed=0)
    cpu = torch.device("cpu")
    executor = TorchExecutor(models.random_dit(models.TINY_DIT, cpu, torch.float32),
                             models.random_vae(models.TINY_VAE, cpu, torch.float32), cpu, torch.float32)
    text = models.RandomTextEncoder(models.random_t5(models.TINY_T5, cpu, torch.float32))
    generation = _Generation(s, text, executor, graphs=True)
    rec = harness.Recorder(cpu)
    generation.run(rec)
    stages = rec.stages()
    assert list(stages) == ["text encoder", "prep", "dit step 1", "dit step 2", "dit step 3", "dit step 4",
                            "vae decode", "total"]
    graphed = {"text encoder": [0.1], "prep": [0.01], "dit": [2.0], "vae decode": [0.5], "total": [2.61]}
    assert harness.dit_step_median(graphed) == pytest.approx(0.5)
    assert "dit" in harness.stage_summary(graphed)


@pytest.mark.parametrize("kwargs, message", [
    ({"tiny": True, "weights": "w"}, "--tiny"),
    ({"tiny": False}, "hours"),
    ({"backends": "torch,trt"}, "choose from"),
    ({"warmup": 0}, "--warmup"),
    ({"size": "100x64"}, "multiples of 16"),
])
def test_bad_settings_fail_before_anything_loads(kwargs, message, tmp_path):
    args = {"backends": "torch", "size": None, "duration": None, "device": "cpu", "weights": None, "engines": None,
            "original": None, "tiny": True, "warmup": 1, "repeat": 1, "prompt": "x", "seed": 0, **kwargs}
    if args["weights"]:
        args["weights"] = tmp_path
    with pytest.raises(K4TRTError, match=message):
        settings.resolve(**args)


def test_k4trt_bench_subcommand_parses():
    from k4trt.cli import bench

    parser = argparse.ArgumentParser(prog="k4trt")
    bench.add_parser(parser.add_subparsers(dest="name"))
    args = parser.parse_args(["bench", "--tiny", "--backends", "torch"])
    assert args.tiny and args.backends == "torch" and args.command is not None


def test_flash_attn_shim_attends_within_each_sequence():
    heads, dim = 2, 8
    lengths = [5, 3]
    qkv = torch.randn(sum(lengths), 3, heads, dim)
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    out, lse, probs = flash_attn_shim.flash_attn_varlen_qkvpacked_func(qkv, cu, max(lengths), return_attn_probs=True)
    assert lse is None and probs is None
    start = 0
    for n in lengths:
        q, k, v = qkv[start:start + n].unbind(1)  # [n, heads, dim]
        scores = torch.einsum("qhd,khd->hqk", q, k) / dim**0.5
        expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        torch.testing.assert_close(out[start:start + n], expected)
        start += n


def _result(device: str, date: str, totals: dict[str, float | None]) -> dict:
    backends = {}
    for name, total in totals.items():
        backends[name] = ({"status": "ok", "summary": {"total": {"median_s": total}}} if total is not None
                          else {"status": "skipped", "reason": "engines missing"})
    return {"schema": 1, "date": date, "commit": "c", "device": {"name": device},
            "settings": {"width": 672, "height": 384, "duration_s": 12, "weights": "random"}, "backends": backends}


def _write(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def committed(tmp_path):
    results = tmp_path / "results"
    _write(results / "a" / "result.json", _result("NVIDIA H100", "2026-01-01T00:00:00+00:00", {"torch": 20.0}))
    _write(results / "b" / "result.json", _result("NVIDIA H100", "2026-02-01T00:00:00+00:00",
                                                  {"torch": 10.0, "trt-fp8": 3.0}))
    _write(results / "c" / "result.json", _result("NVIDIA H200", "2026-03-01T00:00:00+00:00", {"torch": 5.0}))
    return results


def test_compare_flags_a_20_percent_slowdown(committed, tmp_path, capsys):
    new = _write(tmp_path / "new.json", _result("NVIDIA H100", "2026-04-01T00:00:00+00:00",
                                                {"torch": 12.0, "trt-fp8": 3.0}))
    assert k4trt_main(["bench-compare", str(new), "--against", str(committed)]) == 1
    out = capsys.readouterr().out
    assert "b/result.json" in out  # the newest result of the same device, not the H200's or the older one
    assert "torch" in out and "REGRESSION" in out and "+20.0%" in out


def test_compare_passes_a_5_percent_slowdown(committed, tmp_path):
    new = _write(tmp_path / "new.json", _result("NVIDIA H100", "2026-04-01T00:00:00+00:00",
                                                {"torch": 10.5, "trt-fp8": 2.9}))
    assert k4trt_main(["bench-compare", str(new), "--against", str(committed)]) == 0


def test_compare_flags_a_backend_that_stopped_running(committed):
    new = _result("NVIDIA H100", "2026-04-01T00:00:00+00:00", {"torch": 10.0, "trt-fp8": None})
    found = compare.find_baseline(new, committed / "new.json", committed)
    assert found is not None
    baseline = found[1]
    findings = {f.backend: f for f in compare.compare(new, baseline)}
    assert findings["trt-fp8"].regressed and "skipped now" in findings["trt-fp8"].detail
    assert not findings["torch"].regressed


def test_compare_without_a_baseline_passes(committed, tmp_path, capsys):
    new = _write(tmp_path / "new.json", _result("NVIDIA B200", "2026-04-01T00:00:00+00:00", {"torch": 99.0}))
    assert k4trt_main(["bench-compare", str(new), "--against", str(committed)]) == 0
    assert "no baseline" in capsys.readouterr().out
