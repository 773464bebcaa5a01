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
each sequence (omni_train.model.kernels.attention's packed core, on the row's sequence boundaries, computed here on
the host). The codec vocabulary is 8,448 wide: its logits are formed whole in fp32 (a 4k-position row holds 140 MB
of them), or with `trainer.logits_chunk` fused with the loss and tiled as the Thinker's head is
(omni_train.model.kernels.head_loss).

DPO (the paper's Talker stage 2; TRL's sigmoid loss, a test checks ours against TRL's): per triplet
  loss = -log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))) + sft_weight * mean CE of the chosen codes,
with pi/ref the sums of the codec log-probs (targets above, eos included) under the policy and the frozen reference
Talker (a ZeRO-3-partitioned copy, or log-probs precomputed into the shards). At step 0 the policy is the reference
and the loss is ln 2.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omni_train.config.schema import Objective
from omni_train.data.batch import sample_bounds
from omni_train.model.kernels.attention import varlen_kwargs
from omni_train.model.kernels.head_loss import HeadLoss
from omni_train.model.lora import adapters_off
from omni_train.model.media import MediaEmbedder
from omni_train.tokens import IGNORE, MEDIA


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


def response_span(labels: torch.Tensor) -> tuple[int, int]:
    """(P, m) of one sample: the spoken response is the last labelled span (the last assistant turn: m text tokens
    then <|im_end|>), starting after P prompt tokens."""
    labelled = (labels != IGNORE).nonzero().flatten()
    if labelled.numel() == 0:
        raise ValueError("a Talker sample needs an assistant turn to speak; this one has no labelled token")
    end = int(labelled[-1]) + 1
    start = end - 1
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    if end - start < 2:
        raise ValueError("the spoken response is empty (only <|im_end|>)")
    return start, end - start - 1


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
    codec = torch.cat([torch.full((p,), -1, device=hidden.device),
                       torch.tensor([ids.pad, ids.bos], device=hidden.device)])
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
    embedded), 3-D positions (3, P + 2 + T) and targets (P + 2 + T,; IGNORE where none). codes: (T,)."""
    t = codes.numel()
    text, codec, pos, tail, first = talker_prompt(hidden, embeds, positions, prompt, reply, bos_embed, eos_embed, ids)
    steps = (first + torch.arange(t, device=pos.device)).expand(3, -1)
    targets = torch.cat([codes.new_full((prompt + 1,), IGNORE), codes, codes.new_tensor([ids.eos])])
    return (torch.cat([text, step_text(tail, pad_embed, t)]), torch.cat([codec, codes]),
            torch.cat([pos, steps], dim=1), targets)


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
    rejected ones, concatenated), `code_lengths` (n, 2; rejected 0 for SFT), `speaker_bos` (n,) and optionally
    `ref_logps` (n, 2). It returns (loss sum, stats): the loss summed over this rank's units (codec targets for
    SFT, triplets for DPO) and a float64 vector of STATS sums, for the loop to normalise across ranks."""

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
        lengths = batch["code_lengths"]
        return float((lengths[:, 0] + 1).sum()) if self.objective == "talker_sft" else float(lengths.shape[0])

    def step_metrics(self, stats: torch.Tensor) -> dict[str, float]:
        return step_metrics(stats.tolist())

    def speaker_bos(self, speakers: list[str | None], device) -> torch.Tensor:
        unknown = sorted({s for s in speakers if s is not None and s not in self.speakers})
        if unknown:
            raise ValueError(f"speakers {unknown} are not in the model's spk_dict.pt ({sorted(self.speakers)})")
        return torch.tensor([self.speakers[s or self.default_speaker] for s in speakers], device=device)

    def _thinker_states(self, input_ids, position_ids, varlen, audio_features, audio_lengths, pixel_values, grid_thw):
        """The Thinker's last hidden states and input embeddings (media positions zeroed), without gradient."""
        with torch.no_grad():
            embeds = self.media(input_ids, audio_features, audio_lengths, pixel_values, grid_thw)
            hidden = self.thinker.model.language_model(
                inputs_embeds=embeds, position_ids=position_ids, use_cache=False, **varlen).last_hidden_state
            media = torch.isin(input_ids, torch.tensor(MEDIA, device=input_ids.device))
            return hidden, embeds.masked_fill(media.unsqueeze(-1), 0.0)

    def _thinker_side(self, batch: dict):
        """The Thinker's states of a micro-batch, the special text-track embeddings and the samples' places."""
        input_ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
        varlen = varlen_kwargs(batch["cu_seq_lens"], batch["max_length"])
        hidden, embeds = self._thinker_states(input_ids, positions, varlen, batch.get("audio_features"),
                                              batch.get("audio_lengths"), batch.get("pixel_values"),
                                              batch.get("grid_thw"))
        table = self.thinker.model.get_input_embeddings()
        with torch.no_grad():
            specials = table(torch.cat([torch.tensor([self.ids.text_eos, self.ids.text_pad], device=input_ids.device),
                                        batch["speaker_bos"]]))
        samples = _samples(positions[0], labels)
        if len(samples) != len(batch["speaker_bos"]):
            raise ValueError(f"the batch holds {len(samples)} samples but speakers for {len(batch['speaker_bos'])}")
        return hidden, embeds, specials[0], specials[1], specials[2:], samples

    def prompts(self, batch: dict) -> tuple[list[tuple], torch.Tensor]:
        """Per sample, what the Talker reads before its first code (omni_train.model.talker.talker_prompt), and the
        tts_text_pad embedding; for sampling codes (omni_train.tools.pairs)."""
        hidden, embeds, eos_embed, pad_embed, bos_embeds, samples = self._thinker_side(batch)
        labels, positions = batch["labels"], batch["position_ids"]
        out = []
        for i, (r, a, b) in enumerate(samples):
            p, m = response_span(labels[r, a:b])
            out.append(talker_prompt(hidden[r, a:b], embeds[r, a:b], positions[1:, r, a:b], p, m, bos_embeds[i],
                                     eos_embed, self.ids))
        return out, pad_embed

    def sequences(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict, torch.Tensor,
                                              torch.Tensor]:
        """All Talker sequences of a micro-batch in one row: (text track (1, N, H), codec ids (1, N), positions
        (4, 1, N), the row's sequence boundaries for the attention (varlen_kwargs), targets (1, N), sequence index
        per position (N,)); chosen sequences first, then rejected."""
        hidden, embeds, eos_embed, pad_embed, bos_embeds, samples = self._thinker_side(batch)
        labels, positions, lengths = batch["labels"], batch["position_ids"], batch["code_lengths"]
        codes = batch["codes"].split(lengths.t().flatten().tolist())  # chosen of every sample, then rejected
        n = lengths.shape[0]
        parts = []
        for kind in range(2 if self.objective == "talker_dpo" else 1):
            for i, (r, a, b) in enumerate(samples):
                p, m = response_span(labels[r, a:b])
                parts.append(talker_sequence(hidden[r, a:b], embeds[r, a:b], positions[1:, r, a:b], p, m,
                                             codes[kind * n + i], bos_embeds[i], eos_embed, pad_embed, self.ids))
        text = torch.cat([x[0] for x in parts])
        codec, pos, targets = (torch.cat([x[k] for x in parts], dim=-1) for k in (1, 2, 3))
        text_pos = torch.cat([torch.arange(x[0].shape[0], device=text.device) for x in parts])
        index = torch.cat([torch.full((x[0].shape[0],), j, device=text.device) for j, x in enumerate(parts)])
        cu_seq_lens, max_length = sample_bounds([x[0].shape[0] for x in parts])
        return (text[None], codec[None], torch.cat([text_pos[None], pos])[:, None],
                varlen_kwargs(cu_seq_lens.to(text.device), max_length), targets[None], index)

    def codec_logits(self, talker: nn.Module, text: torch.Tensor, codec: torch.Tensor, positions: torch.Tensor,
                     varlen: dict, keep: torch.Tensor) -> torch.Tensor:
        """fp32 codec logits of `talker` (policy or reference) at the `keep` positions of the row (text track plus
        the embedded codec track, through the Talker's projection, decoder and head)."""
        return talker.codec_head(self._hidden(talker, text, codec, positions, varlen)[keep]).float()

    @staticmethod
    def _hidden(talker: nn.Module, text: torch.Tensor, codec: torch.Tensor, positions: torch.Tensor,
                varlen: dict) -> torch.Tensor:
        inputs = text + torch.where((codec >= 0)[..., None],
                                    talker.get_input_embeddings()(codec.clamp(min=0)), 0.0).to(text.dtype)
        return talker.model(inputs_embeds=talker.thinker_to_talker_proj(inputs), position_ids=positions,
                            use_cache=False, **varlen).last_hidden_state

    def token_logps(self, talker: nn.Module, text: torch.Tensor, codec: torch.Tensor, positions: torch.Tensor,
                    varlen: dict, targets: torch.Tensor) -> torch.Tensor:
        """log p(target) at every labelled position of the row, under `talker` (tiled when logits_chunk > 0)."""
        keep = targets != IGNORE
        if self.head_losses is None:
            return -F.cross_entropy(self.codec_logits(talker, text, codec, positions, varlen, keep), targets[keep],
                                    reduction="none")
        hidden = self._hidden(talker, text, codec, positions, varlen)
        head = self.head_losses["talker" if talker is self.talker else "reference"]
        return -head(hidden[keep], targets[keep])

    def forward(self, input_ids, labels, position_ids, conditions, cu_seq_lens, max_length, codes, code_lengths,
                speakers, ref_logps=None, audio_features=None, audio_lengths=None, pixel_values=None, grid_thw=None):
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "cu_seq_lens": cu_seq_lens,
                 "max_length": max_length, "codes": codes,
                 "code_lengths": code_lengths, "speaker_bos": self.speaker_bos(speakers, input_ids.device),
                 "audio_features": audio_features,
                 "audio_lengths": audio_lengths, "pixel_values": pixel_values, "grid_thw": grid_thw}
        text, codec, positions, varlen, targets, index = self.sequences(batch)
        keep = targets[0] != IGNORE
        seq = index[keep]
        logp = self.token_logps(self.talker, text, codec, positions, varlen, targets)
        count = int(index.max()) + 1
        per_seq = torch.zeros(count, dtype=logp.dtype, device=logp.device).index_add(0, seq, logp)
        tokens = torch.zeros(count, dtype=logp.dtype, device=logp.device).index_add(0, seq, torch.ones_like(logp))
        stats = dict.fromkeys(STATS, 0.0)
        n = code_lengths.shape[0]
        if self.objective == "talker_sft":
            loss = -per_seq.sum()
            stats.update(loss=loss.item(), units=tokens.sum().item(), sft_loss=loss.item(),
                         sft_tokens=tokens.sum().item())
            return loss, _vector(stats)
        # Whether the reference runs is a configuration choice, never a per-batch one: under ZeRO-3 every rank
        # must gather the reference's parameters in the same micro-batches.
        if self.reference is not None or self.base_reference:
            with torch.no_grad(), adapters_off(self.talker) if self.base_reference else contextlib.nullcontext():
                ref_logp = self.token_logps(self.talker if self.base_reference else self.reference, text, codec,
                                            positions, varlen, targets)
                ref = torch.zeros_like(per_seq).index_add(0, seq, ref_logp)
        elif ref_logps is None or torch.isnan(ref_logps).any():
            raise ValueError("talker.reference=precomputed, but a sample of this batch has no reference log-probs "
                             "in its shard: build the triplets with `omni-train pairs` (which records them), or use "
                             "talker.reference=model")
        else:
            ref = ref_logps.to(per_seq.dtype).t().flatten()
        dpo, reward_w, reward_l = dpo_sigmoid_loss(per_seq[:n], per_seq[n:], ref[:n], ref[n:], self.beta)
        sft = -per_seq[:n] / tokens[:n]  # mean CE of each chosen sequence
        loss = (dpo + self.sft_weight * sft).sum()
        stats.update(loss=loss.item(), units=n, sft_loss=(-per_seq[:n]).sum().item(),
                     sft_tokens=tokens[:n].sum().item(),
                     dpo_loss=dpo.sum().item(), correct=(reward_w > reward_l).sum().item(),
                     margin=(reward_w - reward_l).sum().item(), reward_chosen=reward_w.sum().item(),
                     reward_rejected=reward_l.sum().item(), logp_chosen=per_seq[:n].sum().item(),
                     logp_rejected=per_seq[n:].sum().item(), triplets=n)
        return loss, _vector(stats)


def _vector(stats: dict[str, float]) -> torch.Tensor:
    return torch.tensor([stats[k] for k in STATS], dtype=torch.float64)


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


def _samples(text_positions: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every sample with labels in a packed batch, row by row (padding "samples" skipped)."""
    out = []
    for r in range(text_positions.shape[0]):
        starts = (text_positions[r] == 0).nonzero().flatten().tolist() + [text_positions.shape[1]]
        for a, b in itertools.pairwise(starts):
            if (labels[r, a:b] != IGNORE).any():
                out.append((r, a, b))
    return out

