"""`omni-train pairs`: on-policy speech preference triplets from the current model, for `talker_dpo`.

    omni-train pairs MODEL_DIR PROMPTS.jsonl OUT.jsonl [--samples 4] [--max-codes 600] [--speaker NAME]

MODEL_DIR is a full Qwen2.5-Omni checkpoint (a Talker stage's export, or the released one). PROMPTS.jsonl holds
conversations in Qwen2.5-Omni's message format whose last turn is the assistant reply to be spoken (media paths
relative to the file). For each: the Thinker runs once on the conversation (our data path: the same tokens, TMRoPE
positions and media features as training), the Talker samples K codec sequences in the training layout
(omni_train.model.talker; top-k / top-p / temperature as transformers' generate defaults), transformers' Token2Wav turns
each into a 24 kHz waveform, and a scorer rates each (lower is better). The best and the worst become the chosen and
rejected codes of a triplet, with their log-probs under the current model recorded as `ref_logps` (the DPO
reference is the model the pairs were sampled from, so `talker.reference=precomputed` needs no reference copy).
A prompt whose samples all score the same is set aside with that reason (they carry no preference).

Scorers (`--scorer`), pluggable through `SCORERS`, built on omni_train/tools/scorers.py (shared with evaluation):
- `wer` (default): word error rate of a transcript against the reply text, plus the pause/duration check below.
  The transcript comes from `--asr`: `pocketsphinx` (default; PyPI's offline English recogniser), `thinker` (the
  model's own Thinker, asked to transcribe the clip) or a local Whisper checkpoint directory.
- `pauses`: the pause/duration check alone: the longest silence (20-ms frames under 1% of the peak RMS) beyond
  `--max-pause` seconds, and speaking time outside [0.04, 0.4] s per character of the reply, each add their excess
  in seconds (the paper ranks by word error rate and by punctuation/pause errors).
The output is a triplet JSONL (`speech: {chosen, rejected, speaker, ref_logps}`, and `scores`) that `omni-prep
build` turns into shards.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from data_prep.chatml import SampleError
from omni_train.files import write_text_atomic
from omni_train.tokens import IGNORE
from omni_train.tools.conversation import absolute_media, prepare_sample
from omni_train.tools.scorers import Score, intelligibility, make_asr, pause_check

def wer_scorer(args, model, tokenizer):
    asr = make_asr(args.asr, model, tokenizer)

    def score(wave: np.ndarray, text: str) -> Score:
        return intelligibility(asr, wave, text, args.max_pause)
    return score


def pause_scorer(args, model, tokenizer):
    def score(wave: np.ndarray, text: str) -> Score:
        penalty, details = pause_check(wave, text, args.max_pause)
        return Score(penalty, {"pause_penalty": penalty, **details})
    return score


SCORERS = {"wer": wer_scorer, "pauses": pause_scorer}


def sample_codes(talker, prompt, pad_embed: torch.Tensor, k: int, max_codes: int, top_k: int, top_p: float,
                 temperature: float, ids) -> tuple[list[torch.Tensor], torch.Tensor]:
    """K codec sequences from `talker` after `prompt` (omni_train.model.talker.talker_prompt), each up to its first
    eos/pad code (exclusive), sampled with a KV cache in the training layout; and the raw logits of every step
    (K, steps, vocabulary), which equal the teacher-forced training forward's on the same codes (a test)."""
    from transformers import DynamicCache

    text, codec, pos, tail, first = prompt
    embed = talker.get_input_embeddings()
    inputs = text + torch.where((codec >= 0)[:, None], embed(codec.clamp(min=0)), 0.0)
    cache = DynamicCache()
    hidden = talker.model(inputs_embeds=talker.thinker_to_talker_proj(inputs)[None].expand(k, -1, -1),
                          position_ids=pos[:, None].expand(-1, k, -1), cache=cache, use_cache=True).last_hidden_state
    codes, raw, done = [], [], torch.zeros(k, dtype=torch.bool)
    for step in range(max_codes):
        logits = talker.codec_head(hidden[:, -1]).float()
        raw.append(logits)
        logits = logits / temperature
        logits[:, ids.bos] = -float("inf")  # as transformers' generate suppresses it
        code = _top_k_top_p(logits, top_k, top_p)
        codes.append(code)
        done |= (code == ids.eos) | (code == ids.pad)
        if done.all():
            break
        step_text = tail[step] if step < tail.shape[0] else pad_embed
        step_in = embed(code) + step_text
        position = (first + step).view(1, 1, 1).expand(3, k, 1)
        hidden = talker.model(inputs_embeds=talker.thinker_to_talker_proj(step_in)[:, None], position_ids=position,
                              cache=cache, use_cache=True).last_hidden_state
    stacked = torch.stack(codes, dim=1)
    out = []
    for row in stacked:
        stop = ((row == ids.eos) | (row == ids.pad)).nonzero()
        out.append(row[: int(stop[0]) if len(stop) else len(row)])
    return out, torch.stack(raw, dim=1)


def spoken_reply(objective, sample, speaker_bos: int, tokenizer):
    """One conversation whose last assistant turn is to be spoken: its packed batch, the reply's text, and what the
    Talker reads before its first code (and the tts_text_pad embedding), from the frozen Thinker."""
    from omni_train.data.batch import collate_packed
    from omni_train.model.talker import response_span

    batch = collate_packed([[sample]], len(sample), tokenizer.pad_token_id)
    batch["speaker_bos"] = torch.tensor([speaker_bos])
    start, reply = response_span(batch["labels"][0])
    text = tokenizer.decode(batch["input_ids"][0, start:start + reply])
    with torch.no_grad():
        (prompt,), pad_embed = objective.prompts(batch)
    return batch, text, prompt, pad_embed


def render(model, codes: torch.Tensor, voice: dict) -> np.ndarray:
    """Token2Wav's 24 kHz waveform of `codes` in the voice of a spk_dict entry."""
    with torch.no_grad():
        return model.token2wav(codes[None], conditioning=voice["cond"].float(),
                               reference_mel=voice["ref_mel"].float()).reshape(-1).float().numpy()


def _top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    values, order = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    probs = values.softmax(dim=-1)
    keep = probs.cumsum(dim=-1) - probs < top_p  # the smallest prefix reaching top_p (at least one)
    probs = torch.where(keep, probs, 0.0)
    pick = torch.multinomial(probs / probs.sum(dim=-1, keepdim=True), 1)
    return order.gather(-1, pick).squeeze(-1)


def build_pairs(args) -> dict:
    from transformers import Qwen2_5OmniForConditionalGeneration

    from omni_train.config.schema import Objective
    from omni_train.model.talker import TalkerLM
    from omni_train.tokenizer import load_tokenizer

    torch.manual_seed(args.seed)
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(args.model).eval()
    tokenizer = load_tokenizer(args.model)
    speakers = {name: int(v["bos_token"]) for name, v in model.speaker_map.items()}
    speaker = args.speaker or next(iter(speakers))
    if speaker not in speakers:
        raise SystemExit(f"omni-train pairs: speaker {speaker} is not in {args.model}/spk_dict.pt ({sorted(speakers)})")
    objective = TalkerLM(model.thinker, model.talker, Objective.talker_dpo, speakers, speaker)
    score = SCORERS[args.scorer](args, model, tokenizer)
    voice = model.speaker_map[speaker]
    base = Path(args.prompts).resolve().parent
    triplets, set_aside = [], []
    records = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    for n, record in enumerate(records):
        rid = record.get("id", f"prompt-{n}")
        try:
            sample = prepare_sample(record, base, tokenizer).sample
        except (SampleError, ValueError) as e:
            set_aside.append({"id": rid, "reason": str(e)})
            continue
        batch, text, prompt, pad_embed = spoken_reply(objective, sample, speakers[speaker], tokenizer)
        with torch.no_grad():
            candidates, _ = sample_codes(model.talker, prompt, pad_embed, args.samples, args.max_codes, args.top_k,
                                         args.top_p, args.temperature, objective.ids)
            scored = [(score(render(model, codes, voice), text), codes) for codes in candidates if len(codes) > 0]
        if len(scored) < 2 or min(s.value for s, _ in scored) == max(s.value for s, _ in scored):
            set_aside.append({"id": rid, "reason": f"{len(scored)} samples with no difference in score: no preference"})
            continue
        scored.sort(key=lambda x: x[0].value)
        (best, chosen), (worst, rejected) = scored[0], scored[-1]
        ref = _reference_logps(objective, model, batch, chosen, rejected)
        triplets.append({"id": rid, "messages": absolute_media(record["messages"], base),
                         "use_audio_in_video": bool(record.get("use_audio_in_video", False)),
                         "speech": {"chosen": chosen.tolist(), "rejected": rejected.tolist(), "speaker": speaker,
                                    "ref_logps": ref},
                         "scores": {"chosen": best.value, "rejected": worst.value, "chosen_details": best.details,
                                    "rejected_details": worst.details, "samples": len(scored)}})
    write_text_atomic(Path(args.out), "".join(json.dumps(t) + "\n" for t in triplets))
    report = {"prompts": len(records), "triplets": len(triplets), "set_aside": set_aside, "out": str(args.out)}
    print(json.dumps(report, indent=2))
    return report


def _reference_logps(objective, model, batch: dict, chosen: torch.Tensor, rejected: torch.Tensor) -> list[float]:
    """log p(chosen), log p(rejected) under the current Talker, exactly as talker_dpo's loss computes them."""
    from omni_train.model.kernels.attention import use_packed_attention

    models = (model.talker.model, model.thinker.model.language_model)
    before = [m.config._attn_implementation for m in models]
    for m in models:  # per-sequence attention over the packed chosen + rejected row, as in training
        use_packed_attention(m)
    try:
        batch = {**batch, "codes": torch.cat([chosen, rejected]),
                 "code_lengths": torch.tensor([[len(chosen), len(rejected)]])}
        text, codec, positions, varlen, targets, index = objective.sequences(batch)
        logp = objective.token_logps(model.talker, text, codec, positions, varlen, targets)
        per_seq = torch.zeros(2, dtype=logp.dtype).index_add(0, index[targets[0] != IGNORE], logp)
        return [float(per_seq[0]), float(per_seq[1])]
    finally:
        for m, name in zip(models, before):
            m.config._attn_implementation_internal = name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omni-train pairs", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a full Qwen2.5-Omni checkpoint directory (with spk_dict.pt)")
    parser.add_argument("prompts", help="JSONL conversations ending with the assistant reply to speak")
    parser.add_argument("out", help="the triplet JSONL to write")
    parser.add_argument("--samples", type=int, default=4, help="codec sequences sampled per prompt (K)")
    parser.add_argument("--max-codes", type=int, default=600, help="codes per sample at most (50 per second)")
    parser.add_argument("--speaker", default=None, help="a key of spk_dict.pt (default: its first)")
    parser.add_argument("--scorer", choices=sorted(SCORERS), default="wer")
    parser.add_argument("--asr", default="pocketsphinx",
                        help="'pocketsphinx' (offline, default), 'thinker' or a local Whisper checkpoint directory")
    parser.add_argument("--max-pause", type=float, default=0.6, help="seconds of silence allowed inside a reply")
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--top-p", type=float, default=0.8)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error("--samples must be at least 2: a pair needs two candidates")
    report = build_pairs(args)
    return 0 if report["triplets"] else 1


if __name__ == "__main__":
    sys.exit(main())
