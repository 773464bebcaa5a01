"""Attention over packed rows, and Ulysses sequence parallelism for the Thinker's language model.

Owns: the per-document causal attention core (`packed_attention`), which finds sample boundaries in a packed row
from its text position row (positions restart at 0 at every sample, see omni_train.data.batch) and runs causal SDPA on
each sample separately, so no L x L mask is ever built and no token attends across samples; and `SequenceParallel`,
which shards a packed row along the sequence over a group of ranks and wraps that core in DeepSpeed's Ulysses
attention (`deepspeed.runtime.sequence_parallel.ulysses_sp.UlyssesSPAttentionHF`, from ALST): an all-to-all turns
each rank's slice of the sequence with all heads into the whole sequence with a share of the heads, the core
attends, and a second all-to-all turns it back.

Why not DeepSpeed's `register_with_transformers`: it replaces transformers' global `sdpa` function (the vision and
audio encoders use it too) and its wrapper drops the attention mask, after which SDPA attends causally over the
whole gathered row, across packed samples. Here the Ulysses layer is registered under its own name and set on the
language model's config only, and its core reads document boundaries from the gathered text positions.
flash-attention's varlen path reads the same boundaries from the same positions, so on GPU the core can be
transformers' `flash_attention_2`.

The encoders share the row's media out over the group and all-gather their outputs, every rank embeds the whole
row, then keeps its slice (ThinkerLM): TMRoPE is applied per slice before the all-to-all, from the slice's own 3-D
positions.
ZeRO-3 treats every rank as data-parallel (ALST's sequence-data-parallel group is the world as well): each rank's
loss covers its slice's labels, so summing gradients over ranks gives the gradient of the whole row's loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKED = "omni_packed_sdpa"
ULYSSES = "omni_ulysses"


def document_spans(text_positions: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each sample in one packed row, from its text positions (0 where a sample starts)."""
    starts = torch.nonzero(text_positions == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return list(zip(starts, [*starts[1:], len(text_positions)]))


def packed_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, position_ids=None,
                     **_) -> tuple[torch.Tensor, None]:
    """Causal attention inside each packed sample: query (B, H, L, D), key/value (B, H_kv, L, D), position_ids the
    (B, L) text positions. Returns (B, L, H, D) as transformers' attention functions do."""
    if position_ids is None:
        raise ValueError("packed attention needs the text position row to find sample boundaries")
    rows = []
    for b in range(query.shape[0]):
        pieces = [
            F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                           dropout_p=dropout, is_causal=True, scale=scaling,
                                           enable_gqa=query.shape[1] != key.shape[1])
            for s, e in document_spans(position_ids[b])
        ]
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def _register(name: str, fn) -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(name, fn)


def use_packed_attention(language_model) -> None:
    """Run the language model's attention per packed sample (no mask is built: a name transformers' mask
    functions do not know makes `create_causal_mask` return None)."""
    _register(PACKED, packed_attention)
    language_model.config._attn_implementation_internal = PACKED


def check_degree(degree: int, heads: int, kv_heads: int) -> str | None:
    """Why `degree` cannot shard attention with these head counts, or None when it can (Ulysses splits heads)."""
    if degree < 1:
        return f"must be >= 1, got {degree}"
    if heads % degree:
        return f"{degree} does not divide the {heads} query heads"
    if kv_heads % degree and degree % kv_heads:
        return f"{degree} and the {kv_heads} key/value heads must divide one another"
    return None


class SequenceParallel:
    """Groups of `degree` consecutive ranks that share each packed row, each holding 1/degree of its tokens."""

    def __init__(self, degree: int):
        self.degree = degree
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if world % degree:
            raise ValueError(f"world size {world} is not a multiple of the sequence-parallel degree {degree}")
        self.group = None
        for first in range(0, world, degree):  # every rank creates every group, as torch requires
            group = torch.distributed.new_group(list(range(first, first + degree)))
            if first <= rank < first + degree:
                self.group = group
        self.rank = rank % degree
        # Ranks of one group read the same rows: data parallelism is over groups.
        self.dp_rank, self.dp_world = rank // degree, world // degree

    def attach(self, language_model, micro_batch_size: int, core) -> None:
        """Route the language model's attention through Ulysses around `core`: "sdpa" (the packed core), another
        transformers attention name (flash_attention_2 reads the same boundaries), or an attention function."""
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
        from transformers import AttentionInterface

        config = language_model.config
        ulysses = UlyssesSPAttentionHF(
            attn=core if callable(core) else packed_attention if core == "sdpa" else AttentionInterface._global_mapping[core],
            batch_size=micro_batch_size,
            attn_head_count=config.num_attention_heads,
            attn_head_size=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            kv_head_count=config.num_key_value_heads,
            num_hidden_layers=config.num_hidden_layers,
            process_group=self.group,
            seq_length_is_variable=True,
        )

        def attention(module, query, key, value, attention_mask, *args, **kwargs):
            rows = query.shape[0]
            if rows != ulysses.batch_size:
                # A micro-batch may hold fewer rows than micro_batch_size (a packing window's last rows); the layer
                # checks shapes against the batch size it was built with (the sequence dims it updates itself).
                ulysses.batch_size = rows
                for name in ("required_query_shape", "required_key_value_shape", "required_context_shape"):
                    shape = getattr(ulysses, name)
                    setattr(ulysses, name, torch.Size([shape[0], rows, *shape[2:]]))
            return ulysses(module, query, key, value, None, *args, **kwargs)

        _register(ULYSSES, attention)
        config._attn_implementation_internal = ULYSSES

    def gather_rows(self, local: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """Every rank's `local` rows (rank r holds counts[r]), differentiably: the backward pass sums each rank's
        gradient for a row and hands it to the row's owner."""
        from torch.distributed.nn.functional import all_gather

        padded = F.pad(local, (0, 0, 0, max(counts) - local.shape[0]))
        return [part[:n] for part, n in zip(all_gather(padded, group=self.group), counts)]

    def shard(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's contiguous slice of `tensor` along the sequence dimension `dim`."""
        length = tensor.shape[dim]
        if length % self.degree:
            raise ValueError(f"row length {length} is not a multiple of the sequence-parallel degree {self.degree}")
        return tensor.narrow(dim, self.rank * (length // self.degree), length // self.degree)
