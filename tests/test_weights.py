"""The weights folder: make-tiny, verify, the DiT checkpoint reader, and download's failure paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch

from k4trt.errors import K4TRTError
from k4trt.models.dit import DiT, infer_dit_config
from k4trt.models.vae import VAEDecoder
from k4trt.weights import download as download_module
from k4trt.weights.checkpoint import read_dit_state_dict
from k4trt.weights.layout import WeightsFolder
from k4trt.weights.tiny import TINY_DIT, make_tiny

RELEASED_FILES = [
    "kandinsky4_distil_512.pt",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors.index.json",
    "tokenizer/spiece.model",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
]


def shards(root: Path) -> list[str]:
    index = json.loads((root / "text_encoder/model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def tiny_copy(tiny_weights, tmp_path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(tiny_weights, tmp_path / "weights"))


# make-tiny ------------------------------------------------------------------------------------------


def test_make_tiny_writes_the_released_layout(tiny_weights):
    for name in RELEASED_FILES:
        assert (tiny_weights / name).is_file(), name
    # The text encoder is sharded, to exercise that layout: several shards, no single file.
    assert len(shards(tiny_weights)) >= 2
    assert all((tiny_weights / "text_encoder" / s).is_file() for s in shards(tiny_weights))
    assert not (tiny_weights / "text_encoder/model.safetensors").exists()
    assert WeightsFolder(tiny_weights).problems() == []
    assert WeightsFolder(tiny_weights).require().root == tiny_weights
    # Nothing left beside it from the atomic build.
    assert [p.name for p in tiny_weights.parent.iterdir()] == [tiny_weights.name]


def test_tiny_weights_load_and_are_all_random(tiny_weights):
    state = read_dit_state_dict(tiny_weights / "kandinsky4_distil_512.pt")
    assert infer_dit_config(state) == TINY_DIT  # loadable with the default RoPE axes
    assert TINY_DIT.num_heads == 4 and TINY_DIT.head_dim == 64
    dit = DiT.from_state_dict(state)
    assert set(dit.state_dict()) == set(state)
    # The original zero-inits modulations; here no tensor may be constant, or tests could not see mistakes.
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32 and tensor.std() > 0.01, name
    modulations = [k for k in state if "modulation" in k]
    assert modulations and all(state[k].abs().min() > 0 for k in modulations)

    vae = VAEDecoder.from_pretrained(tiny_weights / "vae")
    norms = {k: v for k, v in vae.state_dict().items() if "norm" in k}
    assert norms and all(v.std() > 0.01 for v in norms.values())  # GroupNorm affine randomised too


def test_make_tiny_is_deterministic(tiny_weights, tmp_path):
    again = make_tiny(tmp_path / "again", seed=0).root
    assert tree(again) == tree(tiny_weights)  # every file, DiT and VAE included, byte for byte
    other = make_tiny(tmp_path / "other", seed=1).root
    for name in ("kandinsky4_distil_512.pt", "vae/diffusion_pytorch_model.safetensors"):
        assert (other / name).read_bytes() != (tiny_weights / name).read_bytes(), name


def test_make_tiny_refuses_a_non_empty_folder(tmp_path):
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    before = tree(dest), sorted(os.listdir(tmp_path))
    with pytest.raises(K4TRTError, match="not an empty folder") as info:
        make_tiny(dest)
    assert str(dest) in str(info.value)
    assert (tree(dest), sorted(os.listdir(tmp_path))) == before

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(K4TRTError, match="not an empty folder"):
        make_tiny(a_file)
    assert a_file.read_text() == "x"


def test_make_tiny_fills_an_empty_folder(tmp_path):
    dest = tmp_path / "empty"
    dest.mkdir()
    assert make_tiny(dest).problems() == []


# verify ---------------------------------------------------------------------------------------------


def test_each_missing_item_is_named(tiny_copy):
    items = [*RELEASED_FILES, *(f"text_encoder/{s}" for s in shards(tiny_copy))]
    items.remove("tokenizer/tokenizer_config.json")  # optional
    items += ["vae", "text_encoder", "tokenizer", "scheduler"]
    for item in items:
        path = tiny_copy / item
        aside = tiny_copy.parent / "aside"
        path.rename(aside)
        try:
            problems = WeightsFolder(tiny_copy).problems()
            assert problems, item
            named = item if "model.safetensors.index.json" not in item else "text_encoder/model.safetensors"
            assert any(named in p for p in problems), (item, problems)
            with pytest.raises(K4TRTError, match="k4trt weights download") as info:
                WeightsFolder(tiny_copy).require()
            assert named in str(info.value) and "make-tiny" in str(info.value) and "\n" not in str(info.value)
        finally:
            aside.rename(path)
    assert WeightsFolder(tiny_copy).problems() == []


def test_empty_file_and_bad_index_are_reported(tiny_copy):
    (tiny_copy / "scheduler/scheduler_config.json").write_bytes(b"")
    (tiny_copy / "text_encoder/model.safetensors.index.json").write_text("{")
    problems = WeightsFolder(tiny_copy).problems()
    assert any("scheduler_config.json is empty" in p for p in problems)
    assert any("model.safetensors.index.json is not a valid shard index" in p for p in problems)


def test_single_file_text_encoder_is_accepted(tiny_copy):
    te = tiny_copy / "text_encoder"
    for s in shards(tiny_copy):
        (te / s).unlink()
    (te / "model.safetensors.index.json").unlink()
    (te / "model.safetensors").write_bytes(b"weights")
    assert WeightsFolder(tiny_copy).problems() == []


def test_missing_folder_has_its_own_message(tmp_path):
    with pytest.raises(K4TRTError, match=r"weights folder .*nowhere does not exist; run `k4trt weights download"):
        WeightsFolder(tmp_path / "nowhere").require()
    (tmp_path / "file").write_text("x")
    with pytest.raises(K4TRTError, match="is a file, not a folder"):
        WeightsFolder(tmp_path / "file").require()


# DiT checkpoint -------------------------------------------------------------------------------------


def test_truncated_checkpoint(tiny_weights, tmp_path):
    data = (tiny_weights / "kandinsky4_distil_512.pt").read_bytes()
    cut = tmp_path / "kandinsky4_distil_512.pt"
    cut.write_bytes(data[: len(data) // 2])
    message = r"is truncated or corrupt \(.+\); download it again with `k4trt weights download"
    with pytest.raises(K4TRTError, match=message) as info:
        read_dit_state_dict(cut)
    assert str(cut) in str(info.value) and "\n" not in str(info.value)


def test_garbage_checkpoint(tmp_path):
    rng = torch.Generator().manual_seed(7)
    random_bytes = torch.randint(0, 256, (4096,), generator=rng, dtype=torch.uint8).numpy().tobytes()
    html = b"<html>404 Not Found</html>\n" * 20
    for name, data in [("random.pt", random_bytes), ("text.pt", html), ("empty.pt", b"")]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(K4TRTError, match="truncated or corrupt"):
            read_dit_state_dict(path)


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    cases = {
        "list.pt": [torch.zeros(2)],
        "nested.pt": {"state_dict": {"a": torch.zeros(2)}},
        "empty.pt": {},
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(K4TRTError, match="not a (plain )?state dict|empty state dict"):
            read_dit_state_dict(tmp_path / name)
    with pytest.raises(K4TRTError, match="does not exist"):
        read_dit_state_dict(tmp_path / "absent.pt")


def test_legacy_format_checkpoint_is_read_without_mmap(tmp_path):
    """torch.save's pre-1.6 format cannot be memory-mapped; it must still load."""
    generator = torch.Generator().manual_seed(3)
    state = {"a": torch.randn(4, 5, generator=generator), "b": torch.randn(3, generator=generator)}
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    loaded = read_dit_state_dict(tmp_path / "legacy.pt")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_download_offline_fails_in_one_line(tmp_path):
    """The real hub client with HF_HUB_OFFLINE=1, in a subprocess because the hub reads it at import."""
    dest = tmp_path / "weights"
    code = "from k4trt.weights.download import download; download(__import__('sys').argv[1])"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(dest)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("k4trt.errors.K4TRTError: could not reach Hugging Face (")
    assert "check your connection" in last and "copy an existing weights folder" in last


@pytest.mark.parametrize("error", [ConnectionError("Name or service not known"), TimeoutError("timed out")])
def test_download_network_errors(monkeypatch, tmp_path, error):
    def unreachable(*args, **kwargs):
        raise error

    monkeypatch.setattr("huggingface_hub.hf_hub_download", unreachable)
    with pytest.raises(K4TRTError, match=r"^could not reach Hugging Face \(.*\); check your connection") as info:
        download_module.download(tmp_path / "weights")
    assert "\n" not in str(info.value)


def test_download_http_error(monkeypatch, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    def forbidden(repo_id, **kwargs):
        # A stand-in for the HTTP client's response, whose class differs between hub versions.
        response = cast(Any, SimpleNamespace(headers={}, request=None, status_code=403))
        raise HfHubHTTPError("403 Forbidden: too many requests", response=response)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: None)
    monkeypatch.setattr("huggingface_hub.snapshot_download", forbidden)
    with pytest.raises(K4TRTError, match="could not reach Hugging Face .*403"):
        download_module.download(tmp_path / "weights")


def test_download_that_silently_gets_nothing_is_incomplete(monkeypatch, tmp_path):
    # Offline, snapshot_download returns an existing local_dir without an error.
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: None)
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: None)
    message = "incomplete .*kandinsky4_distil_512.pt is missing.*run `k4trt weights download"
    with pytest.raises(K4TRTError, match=message):
        download_module.download(tmp_path / "weights")


def test_download_fetches_the_original_files(monkeypatch, tiny_weights, tmp_path):
    calls = []

    def fake_file(repo_id, filename, local_dir):
        calls.append((repo_id, filename))
        shutil.copy(tiny_weights / filename, Path(local_dir) / filename)

    def fake_snapshot(repo_id, allow_patterns, local_dir):
        calls.append((repo_id, tuple(allow_patterns)))
        for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
            shutil.copytree(tiny_weights / sub, Path(local_dir) / sub)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_file)
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot)
    folder = download_module.download(tmp_path / "new" / "weights")
    assert folder.problems() == []
    assert calls == [
        ("ai-forever/kandinsky-4-t2v-flash", "kandinsky4_distil_512.pt"),
        ("THUDM/CogVideoX-5b", ("vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*")),
    ]


def test_download_refuses_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(K4TRTError, match="is a file"):
        download_module.download(tmp_path / "file")


def test_original_rope_buffers_in_a_checkpoint_are_dropped(tmp_path):
    """A state dict saved from the original's model may hold RoPE3D's angle buffers; they are recomputed."""
    from k4trt.models.dit import DiT
    from k4trt.weights.tiny import TINY_DIT

    g = torch.Generator().manual_seed(5)
    state = {k: torch.randn(v.shape, generator=g) for k, v in DiT(TINY_DIT).state_dict().items()}
    with_buffers = dict(state, **{f"rope_embeddings.args_{i}": torch.randn(128, 8) for i in range(3)})
    torch.save(with_buffers, tmp_path / "ckpt.pt")
    loaded = read_dit_state_dict(tmp_path / "ckpt.pt")
    assert loaded.keys() == state.keys()
    DiT.from_state_dict(loaded)  # strict load still passes
