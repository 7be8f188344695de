"""The prompt encoder: T5-v1.1-XXL's encoder with its sentencepiece tokenizer, used as the original uses it.

The prompt becomes exactly 224 token ids (special tokens added, truncated, padded with <pad>) and is
encoded WITHOUT an attention mask: the pads attend and are attended to, which changes every output
vector, and the DiT was trained on embeddings made that way.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from k4trt.config import TEXT_TOKENS
from k4trt.errors import K4TRTError

if TYPE_CHECKING:
    from transformers import T5EncoderModel, T5Tokenizer

_REFETCH = "download them again with `k4trt weights download DIR`"


class TextEncoder:
    """`encode(prompt) -> [224, d_model]` embeddings in the model's dtype, on its device."""

    def __init__(self, model: T5EncoderModel, tokenizer: T5Tokenizer, max_length: int = TEXT_TOKENS) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        text_encoder_dir: Path | str,
        tokenizer_dir: Path | str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TextEncoder:
        """Load `T5EncoderModel` and `T5Tokenizer` as the original does.

        The explicit `.to(dtype)` after loading matters: some transformers versions keep T5's `wo` layers in
        float32 when loading in half precision, whereas the original loaded in float32 and then cast the
        whole model, `wo` included.
        """
        from transformers import T5EncoderModel, T5Tokenizer

        text_encoder_dir, tokenizer_dir = Path(text_encoder_dir), Path(tokenizer_dir)
        for folder, what in ((text_encoder_dir, "text encoder"), (tokenizer_dir, "tokenizer")):
            if not folder.is_dir():
                raise K4TRTError(f"{what} folder {folder} does not exist; fill the weights folder with "
                                 "`k4trt weights download DIR`")
        try:
            tokenizer = T5Tokenizer.from_pretrained(str(tokenizer_dir), clean_up_tokenization_spaces=False)
        except Exception as e:  # transformers/sentencepiece report bad files as many exception types
            raise K4TRTError(
                f"could not load the tokenizer from {tokenizer_dir} ({_reason(e)}); {_REFETCH}"
            ) from None
        try:
            with quiet_transformers():
                model = T5EncoderModel.from_pretrained(str(text_encoder_dir), dtype=dtype)
        except Exception as e:
            raise K4TRTError(
                f"could not load the text encoder from {text_encoder_dir} ({_reason(e)}); {_REFETCH}"
            ) from None
        # pyright misreads transformers' decorated `to`.
        model.requires_grad_(False).to(device=device, dtype=dtype)  # pyright: ignore[reportCallIssue]
        if model.config.vocab_size < len(tokenizer):
            raise K4TRTError(
                f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens but the text encoder in {text_encoder_dir} "
                f"embeds only {model.config.vocab_size}; use the tokenizer/ and text_encoder/ of one model"
            )
        return cls(model, tokenizer)

    @property
    def d_model(self) -> int:
        return self.model.config.d_model

    @property
    def device(self) -> torch.device:
        return self.model.device

    def token_ids(self, prompt: str) -> torch.Tensor:
        """[1, 224] int64 ids: the prompt's tokens and </s>, cut to fit, then <pad> to the end."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise K4TRTError("the prompt is empty; describe the video to generate")
        total = len(self.tokenizer(prompt, add_special_tokens=True, verbose=False).input_ids)
        if total > self.max_length:
            warnings.warn(
                f"the prompt is {total} tokens long; only the first {self.max_length} are used "
                f"({total - self.max_length} dropped). Shorten it to keep its end.",
                stacklevel=2,
            )
        return self.tokenizer(
            prompt,
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            padding="max_length",
            return_tensors="pt",
        ).input_ids

    @torch.inference_mode()
    def encode(self, prompt: str) -> torch.Tensor:
        """[224, d_model] last hidden state, no attention mask (see the module docstring)."""
        ids = self.token_ids(prompt).to(self.device)
        return self.model(input_ids=ids).last_hidden_state[0]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-file progress bars (noise for one-off loads and saves), then restore them."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
