"""Simple baselines measured with the same metrics code and the same users as the model.

    pop = MostPopular(item_counts)      # (I,) training event counts (items.n_train_events)
    scores = pop.scores(batch)          # (B, I), identical rows

Most-popular scores every item by its number of training events; seen items are excluded by the
metrics code like for the model, and ties are broken pessimistically there (see train/metrics.py),
so items with equal counts do not get lucky ranks.
"""

from __future__ import annotations

import torch


class MostPopular:
    name = "most_popular"

    def __init__(self, item_counts: torch.Tensor):
        self.counts = item_counts.float()  # (I,)

    def scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        B = batch["target"].size(0)
        return self.counts.to(batch["target"].device)[None].expand(B, -1)
