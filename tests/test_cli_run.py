"""`k4trt run` end to end on a tiny model, and every bad input failing as one clear line."""

from __future__ import annotations

import subprocess
import sys
import warnings

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from k4trt import config
from k4trt.cli.main import main
from k4trt.errors import K4TRTError

SIZE = "64x48"  # any multiple of 16 is allowed for a non-released checkpoint


def run(args, capsys):
    code = main(["run", *args, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def count_frames(path) -> int:
    reader = imageio_ffmpeg.read_frames(str(path))
    next(reader)  # metadata
    return sum(1 for _ in reader)


@pytest.mark.parametrize("seconds", [1, 2])
def test_run_writes_mp4_with_all_frames(tiny_weights, tmp_path, capsys, seconds):
    out = tmp_path / "video.mp4"
    frames = tmp_path / "frames.npy"
    code, stdout, _ = run(["a fox in the snow", "--weights", str(tiny_weights), "--size", SIZE, "--duration",
                           str(seconds), "--seed", "3", "-o", str(out), "--save-frames", str(frames)], capsys)
    assert code == 0
    latent_t = 2 * seconds + 1
    assert count_frames(out) == 4 * (latent_t - 1) + 1
    saved = np.load(frames)
    assert saved.dtype == np.float32 and saved.shape == (4 * (latent_t - 1) + 1, 48, 64, 3)
    assert 0.0 <= saved.min() and saved.max() <= 1.0 and saved.std() > 0
    assert str(out) in stdout and "total" in stdout


def test_image_for_duration_zero(tiny_weights, tmp_path, capsys):
    out = tmp_path / "image.png"
    code, _, _ = run(["a fox", "--weights", str(tiny_weights), "--size", SIZE, "--duration", "0", "-o", str(out)],
                     capsys)
    assert code == 0
    from PIL import Image

    assert Image.open(out).size == (64, 48)


def test_same_seed_same_latents(tiny_weights, tmp_path, capsys):
    paths = []
    for i, seed in enumerate([11, 11, 12]):
        latents = tmp_path / f"latents{i}.npy"
        code, _, _ = run(["a fox", "--weights", str(tiny_weights), "--size", SIZE, "--duration", "1", "--seed",
                          str(seed), "-o", str(tmp_path / f"v{i}.mp4"), "--save-latents", str(latents)], capsys)
        assert code == 0
        paths.append(np.load(latents))
    assert paths[0].dtype == np.float32 and paths[0].shape == (3, 6, 8, 16)
    assert np.array_equal(paths[0], paths[1])
    assert not np.allclose(paths[0], paths[2])


def test_report_json(tiny_weights, tmp_path, capsys):
    import json

    report = tmp_path / "report.json"
    code, _, _ = run(["a fox", "--weights", str(tiny_weights), "--size", SIZE, "--duration", "1", "-o",
                      str(tmp_path / "v.mp4"), "--report", str(report)], capsys)
    assert code == 0
    data = json.loads(report.read_text())
    assert {"text encoder", "dit step 1", "dit step 4", "vae decode", "video encode", "total"} <= set(data["stages_s"])
    assert "reference" not in data and data["settings"]["duration_s"] == 1  # 11 s is for 12 s at 672x384 only


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "60x48"], "multiples of 16"),
        (["--size", "big"], "WIDTHxHEIGHT"),
        (["--duration", "13"], "outside 0–12"),
        (["--duration", "2.5"], "whole number"),
        (["--duration", "-1"], "outside 0–12"),
    ],
)
def test_bad_request_is_one_line_and_writes_nothing(tiny_weights, tmp_path, capsys, args, message):
    out = tmp_path / "v.mp4"
    code, _, err = run(["a fox", "--weights", str(tiny_weights), "-o", str(out), *args], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert list(tmp_path.iterdir()) == []


def test_empty_prompt(tiny_weights, tmp_path, capsys):
    code, _, err = run(["  ", "--weights", str(tiny_weights), "-o", str(tmp_path / "v.mp4")], capsys)
    assert code == 2 and "prompt is empty" in err and list(tmp_path.iterdir()) == []


def test_output_in_missing_or_unusable_folder(tiny_weights, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    for out, message in [(tmp_path / "missing" / "v.mp4", "does not exist"),
                         (tmp_path / "file.txt" / "v.mp4", "does not exist"),
                         (tmp_path / "v.avi", "use a .mp4"),
                         (tmp_path / "v.png", "a PNG holds one frame")]:
        code, _, err = run(["a fox", "--weights", str(tiny_weights), "--size", SIZE, "--duration", "1",
                            "-o", str(out)], capsys)
        assert code == 2 and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_missing_weights_folder_and_file(tiny_weights, tmp_path, capsys):
    code, _, err = run(["a fox", "--weights", str(tmp_path / "nowhere"), "-o", str(tmp_path / "v.mp4")], capsys)
    assert code == 2 and "nowhere" in err and "k4trt weights download" in err

    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_weights, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    code, _, err = run(["a fox", "--weights", str(broken), "-o", str(tmp_path / "v.mp4")], capsys)
    assert code == 2 and "diffusion_pytorch_model.safetensors" in err
    assert not (tmp_path / "v.mp4").exists()


def test_truncated_and_reshaped_checkpoint(tiny_weights, tmp_path, capsys):
    import shutil

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_weights, truncated)
    ckpt = truncated / "kandinsky4_distil_512.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    code, _, err = run(["a fox", "--weights", str(truncated), "-o", str(tmp_path / "v.mp4")], capsys)
    assert code == 2 and "truncated or corrupt" in err

    reshaped = tmp_path / "reshaped"
    shutil.copytree(tiny_weights, reshaped)
    ckpt = reshaped / "kandinsky4_distil_512.pt"
    state = torch.load(ckpt, weights_only=True)
    key = "transformer_blocks.0.0.feed_forward.in_layer.weight"
    state[key] = torch.randn(state[key].shape[0] + 8, state[key].shape[1])
    torch.save(state, ckpt)
    code, _, err = run(["a fox", "--weights", str(reshaped), "-o", str(tmp_path / "v.mp4")], capsys)
    assert code == 2 and "feed_forward" in err and err.count("\n") == 1
    assert not (tmp_path / "v.mp4").exists()


def test_released_sizes_are_enforced():
    config.check_size(672, 384, released=True)
    with pytest.raises(K4TRTError, match="672x384"):  # the message lists the trained sizes
        config.check_size(640, 384, released=True)


def test_long_prompt_is_truncated_with_a_warning(tiny_weights, tmp_path, capsys):
    prompt = " ".join(["snow fox mountain river"] * 200)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, _ = run([prompt, "--weights", str(tiny_weights), "--size", SIZE, "--duration", "0",
                          "-o", str(tmp_path / "i.png")], capsys)
    assert code == 0
    assert any("224" in str(w.message) for w in caught)


def test_console_script_help_and_error_have_no_traceback(tmp_path):
    help_run = subprocess.run([sys.executable, "-m", "k4trt", "run", "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "--save-latents" in help_run.stdout
    bad = subprocess.run([sys.executable, "-m", "k4trt", "run", "x", "--weights", str(tmp_path / "none")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


def test_gpu_out_of_memory_is_one_line(capsys):
    from k4trt.cli.errors import run_cli

    def oom() -> int:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)\nmore")

    assert run_cli(oom) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Tried to allocate 20.00 GiB" in err and "--duration" in err
