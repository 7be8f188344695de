"""The weights folder, in the original implementation's cache layout so users can point at what they have.

```
DIR/kandinsky4_distil_512.pt                 DiT state dict (ai-forever/kandinsky-4-t2v-flash)
DIR/vae/config.json, diffusion_pytorch_model.safetensors          (THUDM/CogVideoX-5b from here on)
DIR/text_encoder/config.json, model.safetensors  (or model.safetensors.index.json + its shards)
DIR/tokenizer/spiece.model                   (tokenizer_config.json optional)
DIR/scheduler/scheduler_config.json
```
Only presence and shape of the layout are checked here (cheap); contents are checked when loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from k4trt.errors import K4TRTError

DIT_FILE = "kandinsky4_distil_512.pt"
SHARD_INDEX = "model.safetensors.index.json"



def tiny_folder_for(root: Path) -> Path:
    """Where to suggest `make-tiny` for a user who asked for `root`: `root` itself when make-tiny can write it
    (new or empty), else a new `tiny-weights` beside it. A checkout's `weights/` holds its tracked README and
    is where the released weights go, so a tiny random model is never suggested into it."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return root
    return root.parent / "tiny-weights"


def how_to_fill(root: Path) -> str:
    tiny = tiny_folder_for(root)
    then = "" if tiny == root else f", then pass --weights {tiny}"
    return f"run `k4trt weights download {root}` (or `k4trt weights make-tiny {tiny}`{then} for a tiny test model)"


class WeightsFolder:
    """Paths of every item in a weights folder, and what is missing from it."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.dit = self.root / DIT_FILE
        self.vae = self.root / "vae"
        self.text_encoder = self.root / "text_encoder"
        self.tokenizer = self.root / "tokenizer"
        self.scheduler = self.root / "scheduler"

    def problems(self, dit_and_vae: bool = True) -> list[str]:
        """One line per missing or malformed item, naming its path; empty when the folder is complete. Without
        `dit_and_vae`, only what a run over engines reads (text encoder, tokenizer, scheduler): the DiT and
        the VAE are compiled into the engines."""
        if not self.root.exists():
            return [f"{self.root} does not exist"]
        if not self.root.is_dir():
            return [f"{self.root} is a file, not a folder"]
        found: list[str] = []
        dit_and_vae_files = [self.dit, self.vae / "config.json", self.vae / "diffusion_pytorch_model.safetensors"]
        required = dit_and_vae_files if dit_and_vae else []
        required += [
            self.text_encoder / "config.json",
            self.tokenizer / "spiece.model",
            self.scheduler / "scheduler_config.json",
        ]
        for path in required:
            if not path.is_file():
                found.append(f"{path} is missing")
            elif path.stat().st_size == 0:
                found.append(f"{path} is empty")
        found += self._text_encoder_weight_problems()
        return found

    def _text_encoder_weight_problems(self) -> list[str]:
        """Either one model.safetensors, or an index plus every shard it names (transformers' two layouts)."""
        single = self.text_encoder / "model.safetensors"
        index = self.text_encoder / SHARD_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                return [f"{index} is not a valid shard index ({type(e).__name__}: {e})"]
            return [f"{self.text_encoder / s} is missing (listed in {SHARD_INDEX})"
                    for s in shards if not (self.text_encoder / s).is_file()]
        if single.is_file():
            return []
        return [f"{single} (or {SHARD_INDEX} with its shards) is missing"]

    def require(self, dit_and_vae: bool = True) -> WeightsFolder:
        """Raise a K4TRTError listing everything missing and how to get it; return self when complete."""
        how = how_to_fill(self.root)
        if not self.root.exists():
            raise K4TRTError(f"weights folder {self.root} does not exist; {how}")
        if not self.root.is_dir():
            raise K4TRTError(f"weights folder {self.root} is a file, not a folder; pass a folder, or {how}")
        found = self.problems(dit_and_vae)
        if found:
            raise K4TRTError(f"weights folder {self.root} is incomplete: {'; '.join(found)}; {how}")
        return self
