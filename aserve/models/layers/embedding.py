"""Vocabulary-parallel token embedding and LM head.

Each rank holds a contiguous range of rows of the vocabulary. The embedding looks up the
tokens that fall in its range (others give zeros) and all-reduces; the LM head produces its
slice of the logits and all-gathers them. When the vocabulary does not divide by the number
of ranks (GPT-2's 50257 over 2), it is padded at the end with rows that no token id reaches,
and the gathered logits are cut back to the real vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aserve.distributed import current_group
from aserve.models.layers.linear import linear


def padded_vocab_size(num_embeddings: int, world_size: int) -> int:
    """The smallest multiple of world_size that holds every row (the same at world size 1)."""
    return -(-num_embeddings // world_size) * world_size


class VocabParallelEmbedding(nn.Module):
    """Token embedding [vocab_size, embedding_dim] sharded along the vocabulary."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.tp = current_group()
        self.tp_rank, self.tp_size = self.tp.rank, self.tp.world_size
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_padded = padded_vocab_size(num_embeddings, self.tp_size)
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = self.vocab_start + self.num_embeddings_per_partition
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def _copy_rows(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        """This rank's rows of a full [num_embeddings, ...] tensor; padding rows are zero."""
        real = loaded[self.vocab_start:min(self.vocab_end, self.num_embeddings)]
        param.data[:real.shape[0]].copy_(real)
        param.data[real.shape[0]:].zero_()

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        """Copy this rank's rows of the full [vocab_size, embedding_dim] checkpoint tensor."""
        if loaded_weight.shape != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"shape mismatch: embedding {(self.num_embeddings, self.embedding_dim)}, "
                             f"checkpoint {tuple(loaded_weight.shape)}")
        self._copy_rows(param, loaded_weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = (input_ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection hidden -> vocab logits, sharded like the embedding.

    `tie_weights(embedding)` makes it share the embedding's parameter (tie_word_embeddings).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False):
        super().__init__(num_embeddings, embedding_dim)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.num_embeddings_per_partition), requires_grad=False)
            self.bias.weight_loader = self._bias_loader
        else:
            self.register_parameter("bias", None)

    def _bias_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        self._copy_rows(param, loaded_weight)

    def tie_weights(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding's weight, so loading either name fills both."""
        self.weight = embedding.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is applied through get_logits(), not called")

    def get_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [N, vocab_size] in the model's dtype. The one-pass sampler
        reads them as they are; what needs float32 (logprobs, the logits processors) converts:
        a float32 copy of a batch-256 step's logits is a 51 MB write at OPT's vocabulary."""
        logits = linear(hidden_states, self.weight, self.bias)
        if self.tp_size > 1:
            logits = self.tp.all_gather(logits)[:, :self.num_embeddings]
        return logits
