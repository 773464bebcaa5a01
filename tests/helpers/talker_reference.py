"""The Talker objective's forward as it was before the batch carried the samples' places (commit f8d70a4): samples
found from the text positions (a `.nonzero().tolist()` per row), reply spans from the labels, targets marked with
IGNORE and selected by a mask, the stats read back value by value (`.item()`) into a CPU vector. The reference the
new forward must equal bit for bit on the CPU (tests/test_talker.py).

`reference_forward(objective, batch)` runs it on a TalkerLM's modules, on a batch collated today (it reads the
code lengths from the batch's Spoken entries, as the old batch held them in `code_lengths`).
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import torch.nn.functional as F

from omni_train.data.batch import sample_bounds
from omni_train.model.kernels.attention import varlen_kwargs
from omni_train.model.lora import adapters_off
from omni_train.model.talker import STATS, dpo_sigmoid_loss, step_text
from omni_train.tokens import IGNORE


def response_span(labels):
    labelled = (labels != IGNORE).nonzero().flatten()
    end = int(labelled[-1]) + 1
    start = end - 1
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return start, end - start - 1


def talker_prompt(hidden, embeds, positions, prompt, reply, bos_embed, eos_embed, ids):
    p = prompt
    spoken = hidden[p:p + reply] + embeds[p:p + reply]
    text = torch.cat([hidden[:p] + embeds[:p], bos_embed[None], spoken[:1]])
    codec = torch.cat([torch.full((p,), -1, device=hidden.device),
                       torch.tensor([ids.pad, ids.bos], device=hidden.device)])
    start = positions[:, :p].max() + 1
    pos = torch.cat([positions[:, :p], (start + torch.arange(2, device=positions.device)).expand(3, -1)], dim=1)
    return text, codec, pos, torch.cat([spoken[1:], eos_embed[None]]), start + 2


def talker_sequence(hidden, embeds, positions, prompt, reply, codes, bos_embed, eos_embed, pad_embed, ids):
    t = codes.numel()
    text, codec, pos, tail, first = talker_prompt(hidden, embeds, positions, prompt, reply, bos_embed, eos_embed, ids)
    steps = (first + torch.arange(t, device=pos.device)).expand(3, -1)
    targets = torch.cat([codes.new_full((prompt + 1,), IGNORE), codes, codes.new_tensor([ids.eos])])
    return (torch.cat([text, step_text(tail, pad_embed, t)]), torch.cat([codec, codes]),
            torch.cat([pos, steps], dim=1), targets)


def samples(text_positions, labels):
    out = []
    for r in range(text_positions.shape[0]):
        starts = (text_positions[r] == 0).nonzero().flatten().tolist() + [text_positions.shape[1]]
        for a, b in itertools.pairwise(starts):
            if (labels[r, a:b] != IGNORE).any():
                out.append((r, a, b))
    return out


def sequences(objective, batch, code_lengths):
    input_ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    varlen = varlen_kwargs(batch["cu_seq_lens"], batch["max_length"])
    hidden, embeds = objective._thinker_states(input_ids, positions, varlen, batch.get("audio_features"),
                                               batch.get("audio_lengths"), batch.get("pixel_values"),
                                               batch.get("grid_thw"))
    speaker_bos = torch.tensor(objective.speaker_bos(batch["speakers"]), device=input_ids.device)
    table = objective.thinker.model.get_input_embeddings()
    with torch.no_grad():
        specials = table(torch.cat([torch.tensor([objective.ids.text_eos, objective.ids.text_pad],
                                                 device=input_ids.device), speaker_bos]))
    eos_embed, pad_embed, bos_embeds = specials[0], specials[1], specials[2:]
    places = samples(positions[0], labels)
    codes = batch["codes"].split(code_lengths.t().flatten().tolist())
    n = code_lengths.shape[0]
    parts = []
    for kind in range(2 if objective.objective == "talker_dpo" else 1):
        for i, (r, a, b) in enumerate(places):
            p, m = response_span(labels[r, a:b])
            parts.append(talker_sequence(hidden[r, a:b], embeds[r, a:b], positions[1:, r, a:b], p, m,
                                         codes[kind * n + i], bos_embeds[i], eos_embed, pad_embed, objective.ids))
    text = torch.cat([x[0] for x in parts])
    codec, pos, targets = (torch.cat([x[k] for x in parts], dim=-1) for k in (1, 2, 3))
    text_pos = torch.cat([torch.arange(x[0].shape[0], device=text.device) for x in parts])
    index = torch.cat([torch.full((x[0].shape[0],), j, device=text.device) for j, x in enumerate(parts)])
    cu_seq_lens, max_length = sample_bounds([x[0].shape[0] for x in parts])
    return (text[None], codec[None], torch.cat([text_pos[None], pos])[:, None],
            varlen_kwargs(cu_seq_lens.to(text.device), max_length), targets[None], index)


def hidden_states(talker, text, codec, positions, varlen):
    inputs = text + torch.where((codec >= 0)[..., None],
                                talker.get_input_embeddings()(codec.clamp(min=0)), 0.0).to(text.dtype)
    return talker.model(inputs_embeds=talker.thinker_to_talker_proj(inputs), position_ids=positions,
                        use_cache=False, **varlen).last_hidden_state


def token_logps(objective, talker, text, codec, positions, varlen, targets):
    keep = targets != IGNORE
    hidden = hidden_states(talker, text, codec, positions, varlen)
    if objective.head_losses is None:
        return -F.cross_entropy(talker.codec_head(hidden[keep]).float(), targets[keep], reduction="none")
    head = objective.head_losses["talker" if talker is objective.talker else "reference"]
    return -head(hidden[keep], targets[keep])


def reference_forward(objective, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, stats) of `objective` (a TalkerLM) on `batch`, computed as the objective computed them before."""
    code_lengths = torch.tensor([[s.chosen, s.rejected] for s in batch["spoken"]])
    text, codec, positions, varlen, targets, index = sequences(objective, batch, code_lengths)
    keep = targets[0] != IGNORE
    seq = index[keep]
    logp = token_logps(objective, objective.talker, text, codec, positions, varlen, targets)
    count = int(index.max()) + 1
    per_seq = torch.zeros(count, dtype=logp.dtype, device=logp.device).index_add(0, seq, logp)
    tokens = torch.zeros(count, dtype=logp.dtype, device=logp.device).index_add(0, seq, torch.ones_like(logp))
    stats = dict.fromkeys(STATS, 0.0)
    n = code_lengths.shape[0]
    if objective.objective == "talker_sft":
        loss = -per_seq.sum()
        stats.update(loss=loss.item(), units=tokens.sum().item(), sft_loss=loss.item(),
                     sft_tokens=tokens.sum().item())
        return loss, torch.tensor([stats[k] for k in STATS], dtype=torch.float64)
    if objective.reference is not None or objective.base_reference:
        with torch.no_grad(), adapters_off(objective.talker) if objective.base_reference else contextlib.nullcontext():
            ref_logp = token_logps(objective, objective.talker if objective.base_reference else objective.reference,
                                   text, codec, positions, varlen, targets)
            ref = torch.zeros_like(per_seq).index_add(0, seq, ref_logp)
    else:
        ref = batch["ref_logps"].to(per_seq.dtype).t().flatten()
    dpo, reward_w, reward_l = dpo_sigmoid_loss(per_seq[:n], per_seq[n:], ref[:n], ref[n:], objective.beta)
    sft = -per_seq[:n] / tokens[:n]
    loss = (dpo + objective.sft_weight * sft).sum()
    stats.update(loss=loss.item(), units=n, sft_loss=(-per_seq[:n]).sum().item(),
                 sft_tokens=tokens[:n].sum().item(),
                 dpo_loss=dpo.sum().item(), correct=(reward_w > reward_l).sum().item(),
                 margin=(reward_w - reward_l).sum().item(), reward_chosen=reward_w.sum().item(),
                 reward_rejected=reward_l.sum().item(), logp_chosen=per_seq[:n].sum().item(),
                 logp_rejected=per_seq[n:].sum().item(), triplets=n)
    return loss, torch.tensor([stats[k] for k in STATS], dtype=torch.float64)
