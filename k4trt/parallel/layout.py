"""Which rows of the DiT's joint sequence each rank holds, and where they land after the head exchange.

The sequence is the N visual tokens and the 224 text tokens. Each part is cut into P contiguous blocks: rank r
holds visual tokens [r·n, (r+1)·n) with n = ceil(N/P) (the last blocks padded with zero rows at the end, so
every rank holds the same number of rows and one graph serves all ranks) and text tokens [r·224/P, (r+1)·224/P).
A rank's local sequence is [its visual rows; its text rows], the DiT's own [visual; text] order, S = n + 224/P
rows. After the all-to-all each rank holds every rank's S rows for its heads, P·S rows in rank order; `order`
lists, in the single-GPU order [visual 0..N-1; text 0..223], where each real token sits among them. Gathering
by it drops the pad rows, so attention sees exactly the single-GPU keys: an unmasked softmax over pad keys
would change every result, and a mask would change the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenLayout:
    degree: int
    visual: int  # N, real visual tokens
    text: int  # L, text tokens (224)

    @property
    def rows(self) -> int:
        """Visual rows per rank, n = ceil(N/P)."""
        return -(-self.visual // self.degree)

    @property
    def text_rows(self) -> int:
        return self.text // self.degree

    @property
    def local(self) -> int:
        """S, the rows one rank holds: its visual rows, then its text rows."""
        return self.rows + self.text_rows

    @property
    def padding(self) -> int:
        return self.rows * self.degree - self.visual

    def order(self, device: torch.device | str = "cpu") -> Tensor:
        """int64 [N + L]: for each token of [visual; text], its row among the P·S rows the exchange gathers."""
        visual = torch.arange(self.visual)
        text = torch.arange(self.text)
        rows = torch.cat([
            visual // self.rows * self.local + visual % self.rows,
            text // self.text_rows * self.local + self.rows + text % self.text_rows,
        ])
        return rows.to(device)

    def visual_rows(self, tokens: Tensor, rank: int) -> Tensor:
        """Rank `rank`'s rows of per-visual-token data [N, ...] -> [n, ...], zero rows where it runs past N."""
        start = min(rank * self.rows, self.visual)
        stop = min(start + self.rows, self.visual)
        mine = tokens[start:stop]
        short = self.rows - mine.shape[0]
        return torch.cat([mine, mine.new_zeros(short, *mine.shape[1:])]) if short else mine

    def text_block(self, text: Tensor, rank: int) -> Tensor:
        """Rank `rank`'s rows of the text [L, ...] -> [L/P, ...]."""
        return text[rank * self.text_rows : (rank + 1) * self.text_rows]

    def visual_tokens(self, gathered: Tensor) -> Tensor:
        """Every rank's visual rows concatenated in rank order [P·n, ...] -> the N real tokens [N, ...]."""
        return gathered[: self.visual]
