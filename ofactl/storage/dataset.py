"""A PyTorch Dataset over one rate group of a feature store (used by probes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ofactl.storage.zarr_store import open_store


class FeatureDataset(torch.utils.data.Dataset):
    """Items are (utt_id, float32 tensor (frames, layers, dim)).

    ``in_memory=True`` loads the whole group once (small corpora, low rates); otherwise each
    item is read on demand, and each DataLoader worker opens its own handle.
    """

    def __init__(self, store: str | Path, rate: float, utt_ids: Sequence[str] | None = None,
                 layers: Sequence[int] | None = None, in_memory: bool = True) -> None:
        self.store_path, self.rate = Path(store), float(rate)
        g = open_store(self.store_path).group(self.rate)
        done = set(u for u, d, n in zip(g.utt_ids, g.done, g.lengths) if d and n > 0)
        self.utt_ids = [u for u in (utt_ids if utt_ids is not None else g.utt_ids) if u in done]
        self.layers = list(layers) if layers is not None else None
        self._mem = g.load_all() if in_memory else None
        self._group = None if in_memory else g

    def __len__(self) -> int:
        return len(self.utt_ids)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor]:
        u = self.utt_ids[i]
        if self._mem is not None:
            x = self._mem[u]
        else:
            if self._group is None:
                self._group = open_store(self.store_path).group(self.rate)
            x = self._group[u]
        if self.layers is not None:
            x = x[:, self.layers]
        return u, torch.from_numpy(np.asarray(x, dtype=np.float32))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_group"] = None  # reopened in the worker
        return state
