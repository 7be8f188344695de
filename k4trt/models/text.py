"""The prompt encoder: T5-v1.1-XXL's encoder with its sentencepiece tokenizer, used as the original uses it.

The prompt becomes exactly 224 token ids (special tokens added, truncated, padded with <pad>) and is
encoded WITHOUT an attention mask: the pads attend and are attended to, which changes every output
vector, and the DiT was trained on embeddings made that way.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from k4trt.config import TEXT_TOKENS
from k4trt.errors import K4TRTError, first_line, listed
from k4trt.models.files import safetensors_shapes

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
        from transformers import T5EncoderModel

        text_encoder_dir, tokenizer_dir = Path(text_encoder_dir), Path(tokenizer_dir)
        for folder, what in ((text_encoder_dir, "text encoder"), (tokenizer_dir, "tokenizer")):
            if not folder.is_dir():
                raise K4TRTError(f"{what} folder {folder} does not exist; fill the weights folder with "
                                 "`k4trt weights download DIR`")
        tokenizer = load_tokenizer(tokenizer_dir)
        check_text_encoder(text_encoder_dir)
        try:
            with quiet_transformers():
                # With output_loading_info, from_pretrained returns (model, info); its annotation says model only.
                model, info = T5EncoderModel.from_pretrained(  # pyright: ignore[reportGeneralTypeIssues]
                    str(text_encoder_dir), dtype=dtype, output_loading_info=True)
        except Exception as e:
            raise K4TRTError(
                f"could not load the text encoder from {text_encoder_dir} ({first_line(e)}); {_REFETCH}"
            ) from None
        # transformers fills whatever the checkpoint lacks with random values; then every run of one seed
        # would make a different video. Refuse instead (the check above should have caught it already).
        left = [f"{kind.replace('_', ' ')} {listed(sorted(keys))}" for kind, keys in info.items() if keys]
        if left:
            raise K4TRTError(f"the text encoder in {text_encoder_dir} would be partly random-initialised "
                             f"({'; '.join(left)}); {_REFETCH}")
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


def load_tokenizer(tokenizer_dir: Path) -> T5Tokenizer:
    """T5's tokenizer, its sentencepiece model opened by sentencepiece itself first: transformers falls back to
    other formats when that fails and then reports a damaged file as a missing `tiktoken` package."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    spiece = tokenizer_dir / "spiece.model"
    try:
        spm.SentencePieceProcessor(model_file=str(spiece))
    except (OSError, RuntimeError) as e:
        raise K4TRTError(f"{spiece} is not a sentencepiece model ({first_line(e)}); {_REFETCH}") from None
    try:
        with quiet_transformers():
            return T5Tokenizer.from_pretrained(str(tokenizer_dir), clean_up_tokenization_spaces=False)
    except Exception as e:  # transformers reports bad files as many exception types
        raise K4TRTError(f"could not load the tokenizer from {tokenizer_dir} ({first_line(e)}); {_REFETCH}") from None


def t5_weight_files(text_encoder_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The encoder's safetensors files and, for a sharded one, its index's {tensor: shard file}."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    index = text_encoder_dir / SAFE_WEIGHTS_INDEX_NAME
    if not index.is_file():
        return [text_encoder_dir / SAFE_WEIGHTS_NAME], None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not a {tensor: file} object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise K4TRTError(f"{index} is not a valid shard index ({first_line(e)}); {_REFETCH}") from None
    return [text_encoder_dir / name for name in sorted(set(weight_map.values()))], weight_map


def check_text_encoder(text_encoder_dir: Path) -> None:
    """A K4TRTError listing `text_encoder_problems`, if there are any."""
    problems = text_encoder_problems(text_encoder_dir)
    if problems:
        raise K4TRTError(f"the text encoder in {text_encoder_dir} does not fit together: {'; '.join(problems)}; "
                         f"use the config.json, index and weights of one download, or {_REFETCH}")


def text_encoder_problems(text_encoder_dir: Path) -> list[str]:
    """How the weights in `text_encoder_dir` disagree with its config.json and its shard index, from the files'
    headers alone: tensors missing, unexpected or of the wrong shape for the T5 encoder the config describes
    (a wrong `num_layers` or `d_model` shows as exactly that), and index entries naming the wrong shard."""
    from transformers import T5Config, T5EncoderModel

    try:
        with quiet_transformers():
            cfg = T5Config.from_pretrained(str(text_encoder_dir))
        with torch.device("meta"):
            model = T5EncoderModel(cfg)
    except Exception as e:
        return [f"{text_encoder_dir / 'config.json'} is not a usable T5 config ({first_line(e)})"]
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = set(getattr(model, "_tied_weights_keys", None) or ())  # a list, or {copy: source} since transformers 5
    files, weight_map = t5_weight_files(text_encoder_dir)
    found: dict[str, tuple[int, ...]] = {}
    problems = []
    for path in files:
        shapes = safetensors_shapes(path)
        found.update(shapes)
        if weight_map is not None:
            unlisted = sorted(name for name in shapes if weight_map.get(name) != path.name)
            if unlisted:
                problems.append(f"{path.name} holds {listed(unlisted)}, which the shard index places elsewhere")
    if weight_map is not None:
        absent = sorted(name for name in weight_map if name not in found)
        if absent:
            problems.append(f"the shard index lists {listed(absent)}, which no shard holds")
    missing = sorted(expected.keys() - found.keys() - tied)
    unexpected = sorted(found.keys() - expected.keys())
    wrong = sorted(f"{k} {list(found[k])} (config: {list(expected[k])})" for k in expected.keys() & found.keys()
                   if found[k] != expected[k])
    problems += [f"{label} {listed(keys)}" for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                            ("wrong shape", wrong)) if keys]
    if missing or unexpected or wrong:
        blocks = {int(m[1]) for name in found if (m := re.match(r"encoder\.block\.(\d+)\.", name))}
        width = found.get("shared.weight", (0, 0))[-1]
        problems.append(f"config.json says num_layers {cfg.num_layers}, d_model {cfg.d_model}; "
                        f"the weights hold {len(blocks)} blocks of width {width}")
    return problems


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-file progress bars and its log (load reports, fallbacks: noise for one-off loads
    and saves whose failures k4trt reports itself), then restore both."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()
