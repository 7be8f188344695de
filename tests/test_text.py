"""The T5 prompt encoder on make-tiny's sharded T5 and sentencepiece tokenizer.

Parity is exact (torch.equal): the same float32 model on the same ids through the same kernels is
deterministic on a CPU, so any difference means different ids, a mask, or a different output slice.
"""

from __future__ import annotations

import random
import shutil
import warnings

import pytest
import sentencepiece as spm
import torch
from transformers import T5EncoderModel, T5Tokenizer

from k4trt.errors import K4TRTError
from k4trt.models.text import TextEncoder
from k4trt.weights.tiny_corpus import TINY_CORPUS

LENGTH = 224
PAD, EOS = 0, 1
WORDS = TINY_CORPUS.split()


def random_prompts(seed: int, count: int) -> list[str]:
    """Fresh prompts of 3–40 corpus words with odd spacing and an out-of-corpus word now and then."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        words = rng.choices(WORDS, k=rng.randint(3, 40)) + rng.choices(["Zürich", "XQJ-7", "naïve", "42"], k=1)
        rng.shuffle(words)
        prompts.append(rng.choice([" ", "  ", " \t"]).join(words))
    return prompts


@pytest.fixture(scope="module")
def encoder(tiny_weights) -> TextEncoder:
    return TextEncoder.from_pretrained(tiny_weights / "text_encoder", tiny_weights / "tokenizer")


@pytest.fixture(scope="module")
def reference(tiny_weights):
    """transformers called directly, the way the original's T5TextEmbedder calls it."""
    model = T5EncoderModel.from_pretrained(tiny_weights / "text_encoder").eval()
    tokenizer = T5Tokenizer.from_pretrained(tiny_weights / "tokenizer", clean_up_tokenization_spaces=False)
    return model, tokenizer


def test_the_sharded_t5_loads(encoder, tiny_weights):
    assert (tiny_weights / "text_encoder/model.safetensors.index.json").is_file()
    assert encoder.d_model == 32
    assert all(p.dtype == torch.float32 for p in encoder.model.parameters())


def test_encode_equals_transformers_without_mask(encoder, reference):
    model, tokenizer = reference
    for prompt in random_prompts(seed=11, count=6):
        ids = tokenizer(prompt, max_length=LENGTH, truncation=True, add_special_tokens=True,
                        padding="max_length", return_tensors="pt").input_ids
        with torch.no_grad():
            expected = model(ids, output_hidden_states=True)[0][0]
        got = encoder.encode(prompt)
        assert got.shape == (LENGTH, 32) and got.dtype == torch.float32
        assert torch.equal(got, expected), prompt


def test_token_ids_follow_sentencepiece_like_the_original(encoder, tiny_weights):
    """The original used transformers' sentencepiece-backed T5Tokenizer: its ids are spiece's pieces, then
    </s>, then <pad> to 224. Checked against sentencepiece itself so a tokenizer-backend change shows."""
    sp = spm.SentencePieceProcessor(model_file=str(tiny_weights / "tokenizer/spiece.model"))
    for prompt in random_prompts(seed=12, count=20):
        pieces = sp.encode(prompt)
        expected = pieces + [EOS] + [PAD] * (LENGTH - len(pieces) - 1)
        assert encoder.token_ids(prompt)[0].tolist() == expected, prompt


def test_pads_really_take_part(encoder):
    """Masking the pads (what most T5 users do) changes the prompt tokens' vectors: so the parity test
    above does check the no-mask rule, and the rule matters."""
    prompt = random_prompts(seed=13, count=1)[0]
    ids = encoder.token_ids(prompt)
    mask = (ids != PAD).long()
    assert 0 < mask.sum() < LENGTH
    with torch.no_grad():
        masked = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state[0]
    unmasked = encoder.encode(prompt)
    real = mask[0].bool()
    # Random tiny weights give O(1) activations; a real difference is far above float32 noise (1e-6).
    assert (unmasked[real] - masked[real]).abs().max() > 1e-2


def test_long_prompt_is_cut_to_224_with_a_warning(encoder, tiny_weights):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_weights / "tokenizer/spiece.model"))
    prompt = " ".join(random.Random(14).choices(WORDS, k=400))
    pieces = sp.encode(prompt)
    assert len(pieces) + 1 > LENGTH
    with pytest.warns(UserWarning, match=rf"{len(pieces) + 1} tokens long.*\({len(pieces) + 1 - LENGTH} dropped\)"):
        ids = encoder.token_ids(prompt)
    assert ids[0].tolist() == pieces[: LENGTH - 1] + [EOS]
    with pytest.warns(UserWarning):
        assert encoder.encode(prompt).shape == (LENGTH, 32)


def test_prompt_of_exactly_224_tokens_does_not_warn(encoder):
    words = []
    while len(encoder.tokenizer(" ".join(words)).input_ids) < LENGTH:
        words.append("a")
    prompt = " ".join(words)
    assert len(encoder.tokenizer(prompt).input_ids) == LENGTH  # "a" is one piece, so this lands exactly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert encoder.token_ids(prompt)[0, -1] == EOS


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_empty_prompt_is_an_error(encoder, prompt):
    with pytest.raises(K4TRTError, match="prompt is empty"):
        encoder.encode(prompt)


def test_bf16_casts_every_layer(tiny_weights):
    encoder = TextEncoder.from_pretrained(
        tiny_weights / "text_encoder", tiny_weights / "tokenizer", "cpu", torch.bfloat16
    )
    assert {p.dtype for p in encoder.model.parameters()} == {torch.bfloat16}
    assert encoder.encode("a red panda").dtype == torch.bfloat16


def test_load_errors_name_the_folder(tiny_weights, tmp_path):
    with pytest.raises(K4TRTError, match="text encoder folder .*missing.* does not exist"):
        TextEncoder.from_pretrained(tmp_path / "missing", tiny_weights / "tokenizer")

    broken_tok = tmp_path / "tokenizer"
    broken_tok.mkdir()
    (broken_tok / "spiece.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(K4TRTError, match=rf"{broken_tok / 'spiece.model'} is not a sentencepiece model \(.+\); download"):
        TextEncoder.from_pretrained(tiny_weights / "text_encoder", broken_tok)

    broken_te = shutil.copytree(tiny_weights / "text_encoder", tmp_path / "text_encoder")
    shard = sorted(broken_te.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(K4TRTError, match=rf"{shard} is damaged or unreadable \(.+\); download") as info:
        TextEncoder.from_pretrained(broken_te, tiny_weights / "tokenizer")
    assert "\n" not in str(info.value)
