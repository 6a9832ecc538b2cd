"""Vocabulary-parallel token embedding and LM head.

Each rank holds a contiguous range of vocab_size/world rows. The embedding looks up the tokens
that fall in its range (others give zeros) and all-reduces; the LM head produces its slice of
the logits and all-gathers them. The vocabulary is not padded, so it must divide evenly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aserve.distributed import (get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                                tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce)
from aserve.models.layers.linear import divide, linear


class VocabParallelEmbedding(nn.Module):
    """Token embedding [vocab_size, embedding_dim] sharded along the vocabulary."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_per_partition = divide(num_embeddings, self.tp_size)
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = self.vocab_start + self.num_embeddings_per_partition
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        """Copy this rank's rows of the full [vocab_size, embedding_dim] checkpoint tensor."""
        if loaded_weight.shape != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"shape mismatch: embedding {(self.num_embeddings, self.embedding_dim)}, "
                             f"checkpoint {tuple(loaded_weight.shape)}")
        param.data.copy_(loaded_weight[self.vocab_start:self.vocab_end])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = (input_ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return tensor_model_parallel_all_reduce(out)


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
        param.data.copy_(loaded_weight[self.vocab_start:self.vocab_end])

    def tie_weights(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding's weight, so loading either name fills both."""
        self.weight = embedding.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is applied through get_logits(), not called")

    def get_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [N, vocab_size] in float32 (sampling wants float32)."""
        logits = linear(hidden_states, self.weight, self.bias)
        logits = tensor_model_parallel_all_gather(logits)
        return logits.float()
