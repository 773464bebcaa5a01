"""The Talker's training objectives: next-codec-token cross-entropy (`talker_sft`) and DPO on speech preference
triplets (`talker_dpo`), both on the frozen Thinker's hidden states.

Owns: the Talker's input layout for teacher forcing, exactly as transformers' `Qwen2_5OmniForConditionalGeneration.
generate` assembles it at inference (a test compares our logits with the ones its generation loop computes), and
the losses. For one sample (a conversation whose last assistant turn is the spoken response, tokens t_0..t_{m-1}
then <|im_end|>; P prompt tokens before t_0; codec ids c_0..c_{T-1}), the Talker reads P + 2 + T positions:

  position         text track (Thinker width)                         codec track            target
  0 .. P-1         hidden_p + embed_p (media positions' embed zeroed)  - (mask id, not embedded)  -
  P                embed(speaker's text bos)                           embed(codec pad 8292)  -
  P + 1            hidden(t_0) + embed(t_0)                            embed(codec bos 8293)  c_0
  P + 2 + k        reply[k]                                            embed(c_k)             c_{k+1} (last: eos 8294)

where hidden is the Thinker's last hidden state (after its final norm), embed its input embedding, and reply =
[hidden + embed of t_1..t_{m-1}, embed(tts_text_eos 151861), then embed(tts_text_pad 151859) for ever]: one text
token per codec step, no alignment (the "dual track"). Positions: the prompt's TMRoPE positions, then one text
position per step after their maximum. This is transformers' padded-batch path (an attention mask reaches the
Talker, which then adds the codec pad/bos embeddings and computes TMRoPE positions); its `generate` drops an
all-ones mask, so an unpadded batch at inference gets neither (see SPEC.md). We train on the design's layout.

The Thinker runs once per micro-batch (no gradient) on the packed rows as the Thinker objective sees them; every
Talker sequence of the micro-batch (per sample: the chosen codes, and for DPO the rejected codes too, sharing that
one Thinker pass) is laid end to end in one row with per-sequence positions, so the Talker's attention stays inside
each sequence (omni_train.model.kernels.attention's packed core, on the row's sequence boundaries). The codec
vocabulary is 8,448 wide: its logits are formed whole in fp32 (a 4k-position row holds 140 MB of them), only at the
positions that have a target, or with `trainer.logits_chunk` fused with the loss and tiled as the Thinker's head is
(omni_train.model.kernels.head_loss).

This objective's own code reads nothing back from the device: where each sample lies and the lengths of its prompt,
reply and codes come from the collator (omni_train.data.batch.Spoken, found on the host); the row's sequence
boundaries, target positions and the sequence of each target are laid out on the host from them and copied to the
device once per micro-batch; the stats vector is built on the device, and the loop reads the step's sums back once
per optimizer step (a test watches the calls). What it calls still may: the media encoders (omni_train.model.media)
and, off the CUDA half-precision kernel, the packed attention core.

DPO (the paper's Talker stage 2; TRL's sigmoid loss, a test checks ours against TRL's): per triplet
  loss = -log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))) + sft_weight * mean CE of the chosen codes,
with pi/ref the sums of the codec log-probs (targets above, eos included) under the policy and the frozen reference
Talker (a ZeRO-3-partitioned copy, or log-probs precomputed into the shards). At step 0 the policy is the reference
and the loss is ln 2.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from omni_train.config.schema import Objective
from omni_train.data.batch import Spoken, host_to_device, sample_bounds
from omni_train.model.kernels.attention import varlen_kwargs
from omni_train.model.kernels.head_loss import HeadLoss
from omni_train.model.lora import adapters_off
from omni_train.model.media import MediaEmbedder
from omni_train.tokens import MEDIA


@dataclass(frozen=True)
class CodecIds:
    """The Talker config's special ids: codec track (pad, bos, eos) and the Thinker tokens of the text track."""

    pad: int
    bos: int
    eos: int
    text_eos: int
    text_pad: int

    @classmethod
    def of(cls, talker_config) -> CodecIds:
        c = talker_config
        return cls(c.tts_codec_pad_token_id, c.tts_codec_start_token_id, c.tts_codec_end_token_id,
                   c.tts_text_end_token_id, c.tts_text_pad_token_id)


def talker_prompt(hidden: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor, prompt: int, reply: int,
                  bos_embed: torch.Tensor, eos_embed: torch.Tensor, ids: CodecIds
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the Talker reads before its first code, from one sample's Thinker outputs (layout in the module
    docstring): text track (P + 2, H), codec ids (P + 2,; -1 where nothing is embedded), 3-D positions (3, P + 2),
    the text entries of the codec steps that follow (reply: t_1..t_{m-1}, then tts_text_eos; after them every step
    reads tts_text_pad) and the first position of those steps.

    hidden, embeds: (L, H) of the sample (embeds with media positions zeroed); positions: (3, L) TMRoPE; prompt = P,
    reply = m."""
    p = prompt
    spoken = hidden[p:p + reply] + embeds[p:p + reply]  # t_0 .. t_{m-1}
    text = torch.cat([hidden[:p] + embeds[:p], bos_embed[None], spoken[:1]])
    codec = torch.full((p + 2,), -1, device=hidden.device)
    codec[p], codec[p + 1] = ids.pad, ids.bos  # filled there: no copy from the host
    start = positions[:, :p].max() + 1
    pos = torch.cat([positions[:, :p], (start + torch.arange(2, device=positions.device)).expand(3, -1)], dim=1)
    return text, codec, pos, torch.cat([spoken[1:], eos_embed[None]]), start + 2


def step_text(tail: torch.Tensor, pad_embed: torch.Tensor, steps: int) -> torch.Tensor:
    """The text track of `steps` codec steps: the reply tail, then tts_text_pad for ever."""
    if tail.shape[0] >= steps:
        return tail[:steps]
    return torch.cat([tail, pad_embed[None].expand(steps - tail.shape[0], -1)])


def talker_sequence(hidden: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor, prompt: int, reply: int,
                    codes: torch.Tensor, bos_embed: torch.Tensor, eos_embed: torch.Tensor, pad_embed: torch.Tensor,
                    ids: CodecIds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One teacher-forced Talker sequence: text track (P + 2 + T, H), codec ids (P + 2 + T,; -1 where nothing is
    embedded), 3-D positions (3, P + 2 + T) and its T + 1 targets (the codes, then eos), which positions
    P + 1 .. P + 1 + T predict (`target_places`). codes: (T,)."""
    t = codes.numel()
    text, codec, pos, tail, first = talker_prompt(hidden, embeds, positions, prompt, reply, bos_embed, eos_embed, ids)
    steps = (first + torch.arange(t, device=pos.device)).expand(3, -1)
    return (torch.cat([text, step_text(tail, pad_embed, t)]), torch.cat([codec, codes]),
            torch.cat([pos, steps], dim=1), torch.cat([codes, codes.new_full((1,), ids.eos)]))


def target_places(layout: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On the host, for Talker sequences of P prompt tokens and T codes (`layout`: (P, T) each) laid end to end:
    every position's place in its sequence, the positions that predict a target (P + 1 .. P + 1 + T of each) and
    the sequence of each of those."""
    places, keep, owner, offset = [], [], [], 0
    for j, (p, t) in enumerate(layout):
        places.append(torch.arange(p + 2 + t))
        keep.append(offset + p + 1 + torch.arange(t + 1))
        owner.append(torch.full((t + 1,), j))
        offset += p + 2 + t
    return torch.cat(places), torch.cat(keep), torch.cat(owner)


class TalkerRow(NamedTuple):
    """All Talker sequences of a micro-batch in one row (the chosen sequences, then the rejected ones) and their
    codec targets."""

    text: torch.Tensor  # (1, N, H) text track
    codec: torch.Tensor  # (1, N) codec ids, -1 where nothing is embedded
    positions: torch.Tensor  # (4, 1, N): the place in its sequence, then TMRoPE
    varlen: dict  # the sequences' boundaries for the attention (varlen_kwargs)
    targets: torch.Tensor  # (K,) each sequence's codes then eos, sequence by sequence
    keep: torch.Tensor  # (K,) the row positions that predict them
    owner: torch.Tensor  # (K,) the sequence of each
    count: int  # sequences in the row

    def per_sequence(self, values: torch.Tensor) -> torch.Tensor:
        """The sum of `values` (one per target, (K,)) over each sequence's targets: (count,)."""
        return values.new_zeros(self.count).index_add(0, self.owner, values)


def dpo_sigmoid_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                     ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-triplet sigmoid DPO loss and the chosen / rejected rewards (TRL's "sigmoid", reverse KL, no smoothing)."""
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    return -F.logsigmoid(beta * (chosen - rejected)), beta * chosen.detach(), beta * rejected.detach()


# Entries of TalkerLM's per-micro-batch stats vector (sums over this rank's triplets or sequences).
STATS = ("loss", "units", "sft_loss", "sft_tokens", "dpo_loss", "correct", "margin", "reward_chosen",
         "reward_rejected", "logp_chosen", "logp_rejected", "triplets")


class TalkerLM(nn.Module):
    """The Talker's objective on top of the frozen Thinker (media embedded by the Thinker's ZeRO-3-safe
    MediaEmbedder, as for the Thinker objective).

    Submodules (parameter name prefixes): `thinker.` (frozen), `talker.` (trained), and for DPO `reference.` (the
    frozen reference Talker; absent when the shards carry precomputed reference log-probs, or with `base_reference`,
    where the LoRA-adapted Talker with its adapters off is the reference).

    forward takes the packed Thinker batch plus, per sample in order: `codes` (all chosen sequences, then all
    rejected ones, concatenated), `spoken` (its omni_train.data.batch.Spoken entry: place, prompt and reply lengths,
    code lengths), `speakers` (names; None for the default) and optionally `ref_logps` (n, 2). It returns (loss
    sum, stats): the loss summed over this rank's units (codec targets for SFT, triplets for DPO) and a float64
    vector of STATS sums on the loss's device, for the loop to normalise across ranks."""

    def __init__(self, thinker: nn.Module, talker: nn.Module, objective: Objective, speakers: dict[str, int],
                 default_speaker: str, reference: nn.Module | None = None, beta: float = 0.1, sft_weight: float = 0.0,
                 logits_chunk: int = 0, base_reference: bool = False):
        super().__init__()
        if base_reference and reference is not None:
            raise ValueError("the DPO reference is either a copy (`reference`) or the LoRA Talker's base "
                             "(`base_reference`), not both")
        self.thinker = thinker
        # DPO with LoRA: the reference is the policy Talker with its adapters off (omni_train.model.lora)
        self.base_reference = base_reference
        self.media = MediaEmbedder(thinker)
        # > 0: the codec head and its cross-entropy fused and tiled (omni_train.model.kernels.head_loss), as for the Thinker
        self.head_losses = nn.ModuleDict({name: HeadLoss(model.codec_head, logits_chunk) for name, model in
                                          (("talker", talker), ("reference", reference)) if model is not None}) \
            if logits_chunk > 0 else None
        if objective not in (Objective.talker_sft, Objective.talker_dpo):
            raise ValueError(f"TalkerLM objective must be talker_sft or talker_dpo, got {objective}")
        if default_speaker not in speakers:
            raise ValueError(f"talker.speaker={default_speaker} is not among the model's speakers {sorted(speakers)}")
        self.talker, self.reference, self.objective = talker, reference, objective
        self.speakers, self.default_speaker = speakers, default_speaker
        self.beta, self.sft_weight = beta, sft_weight
        self.ids = CodecIds.of(talker.config)
        self.units_name = "codec_tokens" if objective == "talker_sft" else "triplets"

    def units(self, batch: dict) -> float:
        """What the step's loss is averaged over: codec targets (SFT: codes + eos) or triplets (DPO)."""
        spoken = batch["spoken"]
        return float(sum(s.chosen + 1 for s in spoken)) if self.objective == "talker_sft" else float(len(spoken))

    def step_metrics(self, stats: torch.Tensor) -> dict[str, float]:
        return step_metrics(stats.tolist())

    def speaker_bos(self, speakers: list[str | None]) -> list[int]:
        unknown = sorted({s for s in speakers if s is not None and s not in self.speakers})
        if unknown:
            raise ValueError(f"speakers {unknown} are not in the model's spk_dict.pt ({sorted(self.speakers)})")
        return [self.speakers[s or self.default_speaker] for s in speakers]

    def _thinker_states(self, input_ids, position_ids, varlen, audio_features, audio_lengths, pixel_values, grid_thw):
        """The Thinker's last hidden states and input embeddings (media positions zeroed), without gradient."""
        with torch.no_grad():
            embeds = self.media(input_ids, audio_features, audio_lengths, pixel_values, grid_thw)
            hidden = self.thinker.model.language_model(
                inputs_embeds=embeds, position_ids=position_ids, use_cache=False, **varlen).last_hidden_state
            media = torch.stack([input_ids == m for m in MEDIA]).any(dim=0)
            return hidden, embeds.masked_fill(media.unsqueeze(-1), 0.0)

    def _thinker_side(self, batch: dict):
        """The tts_text_eos and tts_text_pad embeddings, and per sample (batch["spoken"], with `speaker_bos`: one id
        each): its Spoken entry, the Thinker's states and the 3-D positions of its prompt and reply, and its
        speaker's bos embedding."""
        input_ids, positions = batch["input_ids"], batch["position_ids"]
        varlen = varlen_kwargs(batch["cu_seq_lens"], batch["max_length"])
        hidden, embeds = self._thinker_states(input_ids, positions, varlen, batch.get("audio_features"),
                                              batch.get("audio_lengths"), batch.get("pixel_values"),
                                              batch.get("grid_thw"))
        table = self.thinker.model.get_input_embeddings()
        with torch.no_grad():
            ids = torch.tensor([self.ids.text_eos, self.ids.text_pad, *batch["speaker_bos"]])
            specials = table(host_to_device(ids, input_ids.device))
        samples = []
        for s, bos_embed in zip(batch["spoken"], specials[2:], strict=True):
            span = slice(s.start, s.start + s.prompt + s.reply)
            samples.append((s, hidden[s.row, span], embeds[s.row, span], positions[1:, s.row, span], bos_embed))
        return specials[0], specials[1], samples

    def prompts(self, batch: dict) -> tuple[list[tuple], torch.Tensor]:
        """Per sample, what the Talker reads before its first code (omni_train.model.talker.talker_prompt), and the
        tts_text_pad embedding; for sampling codes (omni_train.tools.pairs)."""
        eos_embed, pad_embed, samples = self._thinker_side(batch)
        return [talker_prompt(hidden, embeds, positions, s.prompt, s.reply, bos_embed, eos_embed, self.ids)
                for s, hidden, embeds, positions, bos_embed in samples], pad_embed

    def sequences(self, batch: dict) -> TalkerRow:
        """All Talker sequences of a micro-batch in one row, chosen sequences first, then rejected (TalkerRow); its
        places (sequence boundaries, target positions and owners) laid out on the host and copied once."""
        eos_embed, pad_embed, samples = self._thinker_side(batch)
        spoken: list[Spoken] = batch["spoken"]
        codes = batch["codes"].split([s.chosen for s in spoken] + [s.rejected for s in spoken])
        n, parts, layout = len(spoken), [], []
        for kind in range(2 if self.objective == "talker_dpo" else 1):
            for i, (s, hidden, embeds, positions, bos_embed) in enumerate(samples):
                parts.append(talker_sequence(hidden, embeds, positions, s.prompt, s.reply, codes[kind * n + i],
                                             bos_embed, eos_embed, pad_embed, self.ids))
                layout.append((s.prompt, (s.chosen, s.rejected)[kind]))
        text = torch.cat([x[0] for x in parts])
        codec, pos, targets = (torch.cat([x[k] for x in parts], dim=-1) for k in (1, 2, 3))
        places, keep, owner = (host_to_device(x, text.device) for x in target_places(layout))
        cu_seq_lens, max_length = sample_bounds([p + 2 + t for p, t in layout])
        return TalkerRow(text[None], codec[None], torch.cat([places[None], pos])[:, None],
                         varlen_kwargs(host_to_device(cu_seq_lens, text.device), max_length), targets, keep, owner,
                         len(parts))

    def codec_logits(self, talker: nn.Module, row: TalkerRow) -> torch.Tensor:
        """fp32 codec logits (K, vocabulary) of `talker` (policy or reference) at the row's target positions (text
        track plus the embedded codec track, through the Talker's projection, decoder and head)."""
        return talker.codec_head(self._hidden(talker, row)[0, row.keep]).float()

    @staticmethod
    def _hidden(talker: nn.Module, row: TalkerRow) -> torch.Tensor:
        text, codec = row.text, row.codec
        inputs = text + torch.where((codec >= 0)[..., None],
                                    talker.get_input_embeddings()(codec.clamp(min=0)), 0.0).to(text.dtype)
        return talker.model(inputs_embeds=talker.thinker_to_talker_proj(inputs), position_ids=row.positions,
                            use_cache=False, **row.varlen).last_hidden_state

    def token_logps(self, talker: nn.Module, row: TalkerRow) -> torch.Tensor:
        """log p(target) of every codec target of the row (K,), under `talker` (tiled when logits_chunk > 0)."""
        if self.head_losses is None:
            return -F.cross_entropy(self.codec_logits(talker, row), row.targets, reduction="none")
        head = self.head_losses["talker" if talker is self.talker else "reference"]
        return -head(self._hidden(talker, row)[0, row.keep], row.targets)

    def forward(self, input_ids, labels, position_ids, conditions, cu_seq_lens, max_length, codes, spoken, speakers,
                ref_logps=None, audio_features=None, audio_lengths=None, pixel_values=None, grid_thw=None):
        # labels and conditions are the Thinker's: where each reply lies is in `spoken`
        batch = {"input_ids": input_ids, "position_ids": position_ids, "cu_seq_lens": cu_seq_lens,
                 "max_length": max_length, "codes": codes, "spoken": spoken, "speaker_bos": self.speaker_bos(speakers),
                 "audio_features": audio_features, "audio_lengths": audio_lengths, "pixel_values": pixel_values,
                 "grid_thw": grid_thw}
        row = self.sequences(batch)
        logp = self.token_logps(self.talker, row)
        per_seq, tokens = row.per_sequence(logp), row.per_sequence(torch.ones_like(logp))
        n = len(spoken)
        if self.objective == "talker_sft":
            loss = -per_seq.sum()
            return loss, _vector(loss, loss=loss, units=tokens.sum(), sft_loss=loss, sft_tokens=tokens.sum())
        # Whether the reference runs is a configuration choice, never a per-batch one: under ZeRO-3 every rank
        # must gather the reference's parameters in the same micro-batches.
        if self.reference is not None or self.base_reference:
            with torch.no_grad(), adapters_off(self.talker) if self.base_reference else contextlib.nullcontext():
                ref_logp = self.token_logps(self.talker if self.base_reference else self.reference, row)
                ref = row.per_sequence(ref_logp)
        elif ref_logps is None:  # the collator leaves them out unless every sample has them
            raise ValueError("talker.reference=precomputed, but a sample of this batch has no reference log-probs "
                             "in its shard: build the triplets with `omni-train pairs` (which records them), or use "
                             "talker.reference=model")
        else:
            ref = ref_logps.to(per_seq.dtype).t().flatten()
        dpo, reward_w, reward_l = dpo_sigmoid_loss(per_seq[:n], per_seq[n:], ref[:n], ref[n:], self.beta)
        sft = -per_seq[:n] / tokens[:n]  # mean CE of each chosen sequence
        loss = (dpo + self.sft_weight * sft).sum()
        return loss, _vector(loss, loss=loss, units=n, sft_loss=(-per_seq[:n]).sum(), sft_tokens=tokens[:n].sum(),
                             dpo_loss=dpo.sum(), correct=(reward_w > reward_l).sum(),
                             margin=(reward_w - reward_l).sum(), reward_chosen=reward_w.sum(),
                             reward_rejected=reward_l.sum(), logp_chosen=per_seq[:n].sum(),
                             logp_rejected=per_seq[n:].sum(), triplets=n)


def _vector(like: torch.Tensor, **sums: torch.Tensor | float) -> torch.Tensor:
    """The STATS vector (float64, on `like`'s device) of these sums, each a 0-dim tensor or a number (0 where not
    given), stacked there: no value is read back to the host."""
    entries = [sums.get(k, 0.0) for k in STATS]
    return torch.stack([v.detach().double() if isinstance(v, torch.Tensor)
                        else torch.full((), float(v), dtype=torch.float64, device=like.device) for v in entries])


def step_metrics(stats: list[float]) -> dict[str, float]:
    """The logged metrics of one optimizer step from the STATS sums over all ranks and micro-batches."""
    s = dict(zip(STATS, stats))
    out = {"codec_tokens": int(s["sft_tokens"])}
    if s["sft_tokens"]:
        out["sft/loss"] = s["sft_loss"] / s["sft_tokens"]
    if s["triplets"]:
        n = s["triplets"]
        out.update({"dpo/loss": s["dpo_loss"] / n, "dpo/reward_accuracy": s["correct"] / n,
                    "dpo/margin": s["margin"] / n, "dpo/reward_chosen": s["reward_chosen"] / n,
                    "dpo/reward_rejected": s["reward_rejected"] / n, "dpo/logp_chosen": s["logp_chosen"] / n,
                    "dpo/logp_rejected": s["logp_rejected"] / n, "triplets": int(n)})
    return out

