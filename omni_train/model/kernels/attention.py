"""Attention over packed rows (the Thinker's language model and its media encoders), and Ulysses sequence
parallelism for the language model.

Owns: the per-document causal attention core (`packed_attention`), the encoders' bidirectional attention within
each audio chunk or vision window (`encoder_attention`), and `SequenceParallel`.

The core reads a micro-batch's sample boundaries from the keyword arguments transformers' language models pass
through their decoder layers to the attention function (`cu_seq_lens_q`, `max_length_q`: flash-attention's varlen
names, `varlen_kwargs`), computed once per micro-batch on the host by the collator (omni_train.data.batch), so the
model never reads positions back from the device to find where samples end. No L x L mask is ever built and no
token attends across samples. Two kernels, chosen per call by what the inputs allow:
- on CUDA in bf16/fp16 (no dropout): one call of torch's varlen FlashAttention-2 (`torch.nn.attention.varlen.
  varlen_attn`) over the whole micro-batch's rows laid end to end, GQA in the kernel. Written for the GPU machines'
  torch 2.11 (whose varlen_attn takes `window_size`: (-1, 0) causal, (-1, -1) full; earlier ones had `is_causal`) and
  checked on CPU only against this torch's signature: no line of it has run on a GPU yet (tests/gpu/
  test_gpu_spine.py holds its equality tests);
- otherwise (CPU, fp32, dropout): causal SDPA per sample on a split of the rows, bit for bit the per-sample loop it
  replaced and faster in the backward (benchmarks/attention_core.py). FlexAttention, which would make this one call
  with a document mask, has no backward on CPU in torch 2.13. On CUDA this path reads the boundaries back once per
  layer.

The encoders' attention runs the same two kernels without the causal mask. transformers' audio tower attends within
chunks of 100 positions (its n_window: 200 mel frames, 2 s, before the stride-2 convolution; a clip's last chunk
shorter) and its vision encoder within 112-pixel windows (8 x 8 patches), or within each frame (temporal patch) in
its `fullatt_block_indexes` blocks. How their attention layers (`Qwen2_5OmniAudioAttention`,
`Qwen2_5OmniVisionAttention`) call the attention function is the same in transformers 5.24 (this machine) and 5.17
(the GPU machines'): when the config's attention name contains "flash" (`is_flash_attention_requested`), once per
layer over every chunk or window, with their boundaries under the same varlen names (`cu_seq_lens_q/k`,
`max_length_q/k`; the longest read back once per encoder call, `get_max_seqlen`) and `is_causal=False`; under any
other name (`sdpa`, `eager`) once per chunk or window, from a Python loop over a `torch.split` of the heads by
`lengths.tolist()`: a device sync per layer and hundreds of small kernel launches per layer for a long clip or a
video. So `encoder_attention` is registered under a name with "flash" in it (`omni_encoder_flash`, for that
routing alone) and set on the two encoders' configs only (`use_encoder_attention`): one varlen call per layer on
CUDA in half precision; elsewhere SDPA per chunk on a split of the rows, the same SDPA calls on the same views as
transformers' `sdpa` loop, so fp32 outputs and gradients are transformers' bit for bit (tests/
test_attention_core.py), and no slower on CPU (benchmarks/encoder_attention.py). Called without boundaries (as a
transformers that routed by another test, e.g. the exact name `flash_attention_2`, would call it: once per chunk)
it is plain bidirectional SDPA on what it is given. The names are runtime settings: transformers does not write
`_attn_implementation_internal` to config.json, so an export names no function of ours and loads with
transformers' default attention.

`SequenceParallel` shards a packed row along the sequence over a group of ranks and wraps that core in DeepSpeed's
Ulysses attention (`deepspeed.runtime.sequence_parallel.ulysses_sp.UlyssesSPAttentionHF`, from ALST): an all-to-all
turns each rank's slice of the sequence with all heads into the whole sequence with a share of the heads, the core
attends, and a second all-to-all turns it back. The core sees whole rows, so its boundaries are the collator's, for
the unsharded rows (ThinkerLM passes them unsharded).

Why not DeepSpeed's `register_with_transformers`: it replaces transformers' global `sdpa` function (every module
set to `sdpa` calls it, the encoders too under transformers' defaults) and its wrapper drops the attention mask,
after which SDPA attends causally over the whole gathered row, across packed samples. Here the Ulysses layer is
registered under its own name and set on the language model's config only. transformers' `flash_attention_2` reads
the same keyword arguments, so on GPU it can stand in for the core (`model.attn_implementation`).

The encoders share the row's media out over the group and all-gather their outputs, every rank embeds the whole
row, then keeps its slice (ThinkerLM): TMRoPE is applied per slice before the all-to-all, from the slice's own 3-D
positions.
ZeRO-3 treats every rank as data-parallel (ALST's sequence-data-parallel group is the world as well): each rank's
loss covers its slice's labels, so summing gradients over ranks gives the gradient of the whole row's loss.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

PACKED = "omni_packed_sdpa"
ENCODER = "omni_encoder_flash"  # "flash" routes transformers' encoders to one call per layer (module docstring)
ULYSSES = "omni_ulysses"


def varlen_kwargs(cu_seq_lens: torch.Tensor, max_length: int) -> dict:
    """A micro-batch's sample boundaries (omni_train.data.batch.sample_bounds) as the keyword arguments transformers'
    language models pass through their decoder layers to the attention function: flash-attention's varlen names, so
    `flash_attention_2` reads the same ones as the packed core."""
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": max_length,
            "max_length_k": max_length}


def _flash_takes(query: torch.Tensor, dropout: float) -> bool:
    """Whether torch's varlen kernel (FlashAttention-2: CUDA, half precision, no dropout) can run this attention."""
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and not dropout


def _per_sample(query, key, value, cu_seq_lens, scaling, dropout, causal) -> torch.Tensor:
    """SDPA sample by sample over (tokens, heads, D) inputs. The heads are split along the tokens, not sliced: the
    backward of a split is one concatenation, where each slice would add a zero gradient the size of the whole row.
    They are split as SDPA takes them, (1, H, n, D), and its outputs joined the same way, so a sample adds no view or
    copy of its own to the forward or the backward: with short samples (the encoders' chunks) those add up."""
    lengths = cu_seq_lens.diff().tolist()  # host-side on CPU; a device sync per layer on CUDA

    def heads(x):  # (n, H, D) -> SDPA's (1, H, n, D), a view
        return x.transpose(0, 1)[None]

    gqa = query.shape[1] != key.shape[1]
    out = torch.cat([
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal, scale=scaling, enable_gqa=gqa)
        for q, k, v in zip(*(heads(x).split(lengths, dim=2) for x in (query, key, value)))
    ], dim=2)
    return out.squeeze(0).transpose(0, 1).contiguous()


def _varlen(query, key, value, cu_seq_lens, max_length, scaling, causal) -> torch.Tensor:
    """One FlashAttention-2 call over every sample of the micro-batch (torch.nn.attention.varlen)."""
    from torch.nn.attention.varlen import varlen_attn

    # torch >= 2.12 asks for GQA explicitly; the kernel of earlier releases takes fewer key/value heads as they come
    gqa = {"enable_gqa": True} if query.shape[1] != key.shape[1] and _varlen_asks_for_gqa() else {}
    return varlen_attn(query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length, scale=scaling,
                       window_size=(-1, 0) if causal else (-1, -1), **gqa)


@functools.cache
def _varlen_asks_for_gqa() -> bool:
    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def _within_samples(query, key, value, cu_seq_lens, max_length, scaling, dropout, causal) -> torch.Tensor:
    """Attention inside each sample of B rows laid end to end: query (B, H, L, D), key/value (B, H_kv, L, D) ->
    (B, L, H, D), by the kernel the inputs allow (module docstring)."""
    b, h, length, d = query.shape
    # (B, H, L, D) -> (B * L, H, D): the rows end to end, as cu_seq_lens counts them (a view when the projection's
    # (B, L, H, D) layout is underneath, as it is in transformers' attention layers)
    q, k, v = (x.transpose(1, 2).reshape(b * length, x.shape[1], d) for x in (query, key, value))
    if _flash_takes(query, dropout):
        out = _varlen(q, k, v, cu_seq_lens, max_length, scaling, causal)
    else:
        out = _per_sample(q, k, v, cu_seq_lens, scaling, dropout, causal)
    return out.view(b, length, h, d)


def packed_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     max_length_q=None, **_) -> tuple[torch.Tensor, None]:
    """Causal attention inside each packed sample: query (B, H, L, D), key/value (B, H_kv, L, D); cu_seq_lens_q and
    max_length_q the sample boundaries of the B rows laid end to end (varlen_kwargs). Returns (B, L, H, D) as
    transformers' attention functions do."""
    if cu_seq_lens_q is None:
        raise ValueError("packed attention needs the batch's sample boundaries: pass varlen_kwargs(cu_seq_lens, "
                         "max_length) of omni_train.data.batch.collate_packed to the language model")
    return _within_samples(query, key, value, cu_seq_lens_q, max_length_q, scaling, dropout, causal=True), None


def encoder_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                      max_length_q=None, **_) -> tuple[torch.Tensor, None]:
    """Bidirectional attention inside each audio chunk or vision window: query/key/value (1, H, L, D) with the
    encoder's chunk or window boundaries (cu_seq_lens_q, max_length_q), or one chunk (1, H, n, D) without them.
    Returns (1, L, H, D) as transformers' attention functions do."""
    if cu_seq_lens_q is None:
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    return _within_samples(query, key, value, cu_seq_lens_q, max_length_q, scaling, dropout, causal=False), None


def _register(name: str, fn) -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(name, fn)


def use_packed_attention(language_model) -> None:
    """Run the language model's attention per packed sample (no mask is built: a name transformers' mask
    functions do not know makes `create_causal_mask` return None)."""
    _register(PACKED, packed_attention)
    language_model.config._attn_implementation_internal = PACKED


def use_encoder_attention(thinker) -> None:
    """Run the attention of the Thinker's audio tower and vision encoder in one call per layer over all chunks or
    windows (`encoder_attention`); the language model's attention is left as it is."""
    _register(ENCODER, encoder_attention)
    for encoder in (thinker.model.audio_tower, thinker.model.visual):
        encoder.config._attn_implementation_internal = ENCODER


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
