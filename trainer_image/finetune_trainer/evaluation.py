"""The evaluation loss: the mean over every label token of the evaluation set, whatever the
number of workers.

Every rank packs the whole evaluation set the same way (so the rows do not depend on the world
size) and evaluates rows rank, rank + world, ...; each rank sums its token losses and counts
its tokens, and the sums are added over the ranks before the one division. A mean of the
ranks' means would weigh a token by how many tokens its rank happened to get.
"""

from __future__ import annotations

import math

from .data import Row
from .records import IGNORE


def rank_batches(rows: list[Row], rank: int, world: int, micro_batch_size: int) -> list[list[Row]]:
    """This rank's micro-batches. Every rank gets the same number of them (the forward passes
    of ZeRO-3 and FSDP are collectives); a rank whose share is used up runs a row whose labels
    are all ignored, which adds nothing to the sums."""
    share = rows[rank::world]
    per_rank = math.ceil(len(rows) / world)
    n_batches = math.ceil(per_rank / micro_batch_size)
    filler = Row(rows[0].input_ids, [IGNORE] * len(rows[0].labels), rows[0].position_ids)
    return [share[b * micro_batch_size:(b + 1) * micro_batch_size] or [filler] for b in range(n_batches)]


def token_loss_sums(logits, labels) -> tuple[float, int]:
    """(sum of the next-token cross-entropy over the label tokens, their number): the causal
    shift transformers' loss uses, summed rather than averaged."""
    import torch.nn.functional as F

    shifted = labels[:, 1:]
    total = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                            ignore_index=IGNORE, reduction="sum")
    return float(total), int((shifted != IGNORE).sum())


def reduce_sums(parts: list[tuple[float, int]]) -> float:
    """The evaluation loss from every rank's (loss sum, token count)."""
    total = sum(p[0] for p in parts)
    tokens = sum(p[1] for p in parts)
    return total / tokens if tokens else float("nan")
