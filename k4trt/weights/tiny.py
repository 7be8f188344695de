"""`k4trt weights make-tiny DIR`: a complete random model in exactly the released layout, in seconds.

It exercises every loader and code path the released weights do (the sharded text-encoder layout
included) at a size a CPU runs in milliseconds. Every weight is random and non-trivial: the original
zero-initialises its modulations, but zeros would hide wrong shift/scale/gate order from the tests.
The same seed gives byte-identical DiT, VAE, text-encoder and tokenizer files.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save as safetensors_bytes

from k4trt.config import SEED_RANGE, DiTConfig, check_seed
from k4trt.errors import K4TRTError
from k4trt.fsutil import atomic_path, check_name_length, check_writable_dir, write_failed
from k4trt.models.scheduler import COGVIDEOX_5B_SCHEDULER_CONFIG
from k4trt.models.text import quiet_transformers
from k4trt.weights.layout import WeightsFolder, tiny_folder_for
from k4trt.weights.tiny_corpus import TINY_CORPUS

TEXT_DIM = 32  # the tiny T5's d_model, hence the tiny DiT's in_text_dim
# model_dim 256 with the default RoPE axes (16, 24, 24): 4 heads of 64, so the config inferred from the
# checkpoint's shapes (which cannot see the axes) is the one it was made with, and the heads split over the
# 2 or 4 ranks of the sequence-parallel tests.
TINY_DIT = DiTConfig(in_text_dim=TEXT_DIM, time_dim=32, model_dim=256, ff_dim=256, num_blocks=1)
_VOCAB_PIECES = 512  # sentencepiece vocabulary before T5's 100 sentinel ids
_EXTRA_IDS = 100
_TOKENIZER_CONFIG = {  # T5's conventions, in the keys transformers reads from a tokenizer folder
    "tokenizer_class": "T5Tokenizer",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "extra_ids": _EXTRA_IDS,
    "legacy": True,
    "clean_up_tokenization_spaces": False,
}
_SHARD_SIZE = "40KB"  # the tiny T5 is ~150 KB, so it lands in several shards plus an index


def make_tiny(dest: Path | str, seed: int = 0) -> WeightsFolder:
    """Write the tiny model to `dest` (absent or empty), atomically: built beside it, then renamed. `seed` is
    any seed k4trt takes (0 to 2**63-1, `k4trt.config.SEED_RANGE`)."""
    dest = Path(dest)
    seed = check_seed(seed)
    check_name_length(dest, "make-tiny")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        instead = tiny_folder_for(dest)
        fix = f"`k4trt weights make-tiny {instead}`" if not instead.exists() else "choose a new folder"
        raise K4TRTError(f"{dest} already exists and is not an empty folder; make-tiny writes a new folder: {fix}")
    if dest.is_dir() and os.path.ismount(dest):
        raise K4TRTError(f"{dest} is a mount point, which cannot be replaced by the finished folder; make the tiny "
                         f"model inside it: `k4trt weights make-tiny {dest / 'tiny-weights'}`")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failed(dest.parent, e) from None
    check_writable_dir(dest.parent.resolve(), "make-tiny")
    with atomic_path(dest, folder=True) as tmp:
        try:
            _write_model(WeightsFolder(tmp), seed)
        except (OSError, SafetensorError) as e:  # the text encoder is saved by transformers through safetensors
            raise write_failed(dest, e) from None
    return WeightsFolder(dest).require()


def _write_model(folder: WeightsFolder, seed: int) -> None:
    folder.root.mkdir()
    for sub in (folder.vae, folder.text_encoder, folder.tokenizer, folder.scheduler):
        sub.mkdir()
    spiece = _train_tokenizer()
    (folder.tokenizer / "spiece.model").write_bytes(spiece)
    _write_json(folder.tokenizer / "tokenizer_config.json", _TOKENIZER_CONFIG)
    vocab_size = _piece_count(spiece) + _EXTRA_IDS
    _write_text_encoder(folder.text_encoder, vocab_size, seed)
    _write_dit(folder.dit, _sub_seed(seed, 1))
    _write_vae(folder.vae, _sub_seed(seed, 2))
    _write_json(folder.scheduler / "scheduler_config.json", COGVIDEOX_5B_SCHEDULER_CONFIG)


def _sub_seed(seed: int, k: int) -> int:
    """Distinct seeds for the parts, wrapping at 2**63 so every seed works (below the top, seed + k itself)."""
    return (seed + k) % SEED_RANGE.stop


def _train_tokenizer() -> bytes:
    """A unigram sentencepiece model with T5's special ids (pad 0, eos 1, unk 2, no bos). One thread and
    no sampling of the input, so training is deterministic."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_CORPUS.splitlines()),
        model_writer=model,
        model_type="unigram",
        vocab_size=_VOCAB_PIECES,
        hard_vocab_limit=False,  # the corpus is small; take what it supports (a few hundred pieces)
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def _piece_count(spiece: bytes) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=spiece).get_piece_size()


def _write_text_encoder(out: Path, vocab_size: int, seed: int) -> None:
    """A 2-layer T5 v1.1-style encoder (gated GELU, as T5-v1.1-XXL), saved sharded like the released one."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=TEXT_DIM // 4,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(cfg).eval()
    with quiet_transformers():
        model.save_pretrained(out, max_shard_size=_SHARD_SIZE)


def _write_dit(path: Path, seed: int) -> None:
    from k4trt.models.dit import DiT

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DiT(TINY_DIT).state_dict().items()}
    # Serialised in memory and written by Python (here and for the VAE), so a full disk is an OSError naming
    # the cause rather than torch's or safetensors' own errors.
    buffer = io.BytesIO()
    torch.save(_random_weights(shapes, seed), buffer)
    path.write_bytes(buffer.getvalue())


def _write_vae(vae_dir: Path, seed: int) -> None:
    """Decoder keys only (`decoder.*`, as diffusers names them): the encoder is never used, and the loader
    skips it in the released file."""
    from k4trt.models.vae import CONFIG_NAME, WEIGHTS_NAME, VAEDecoder, tiny_vae_config

    cfg = tiny_vae_config()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in VAEDecoder(cfg).state_dict().items()}
    _write_json(vae_dir / CONFIG_NAME, cfg.to_diffusers_config())
    (vae_dir / WEIGHTS_NAME).write_bytes(safetensors_bytes(_random_weights(shapes, seed)))


def _random_weights(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """Seeded random float32 values for every tensor, none zero or one in bulk.

    Matrices and kernels: N(0, 1/fan_in), which keeps activations O(1) layer after layer. Vectors named
    `*weight` are norm gains: 1 + N(0, 0.1²) (around 1, so norms still normalise). Other vectors (biases):
    N(0, 0.1²), so every shift, scale and gate of a modulation is non-zero and distinct.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if len(shape) >= 2:
            weights[name] = noise / math.sqrt(math.prod(shape[1:]))
        elif name.endswith("weight"):
            weights[name] = 1 + 0.1 * noise
        else:
            weights[name] = 0.1 * noise
    return weights


def _write_json(path: Path, data: Mapping[str, object]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

