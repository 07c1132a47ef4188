"""The order in which a run reads its dataset: seeded, endless, resumable, sharded by rank."""

from __future__ import annotations

import torch


class IndexStream:
    """An endless, seeded, resumable stream of dataset indices; rank r takes every world_size-th one.

    Each epoch is a fresh permutation of range(num_examples) seeded by (seed, epoch), so every rank
    computes the same permutation and takes a disjoint share of it. `state_dict` is the data position
    a checkpoint stores.
    """

    def __init__(self, num_examples: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_examples < world_size:
            raise ValueError(f"the dataset has {num_examples} examples, fewer than the {world_size} ranks")
        self.num_examples, self.seed, self.rank, self.world_size = num_examples, seed, rank, world_size
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_examples, generator=generator).tolist()
        usable = len(order) - len(order) % self.world_size  # equal shares keep ranks in step
        return order[self.rank : usable : self.world_size]

    def take(self, count: int) -> list[int]:
        indices = []
        while len(indices) < count:
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation()
            indices.append(self._order[self.cursor])
            self.cursor += 1
        return indices

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation()
