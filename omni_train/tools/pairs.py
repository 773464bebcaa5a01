"""`omni-train pairs`: on-policy speech preference triplets from the current model, for `talker_dpo`, on one process
or split over the ranks of a torchrun or SLURM job.

    omni-train pairs MODEL_DIR PROMPTS.jsonl OUT.jsonl [--samples 4] [--max-codes 600] [--speaker NAME]
                     [--device auto|cpu|cuda] [--precision auto|bf16|fp32]
    torchrun --nproc_per_node N -m omni_train.train pairs MODEL_DIR PROMPTS.jsonl OUT.jsonl [...]
    omni-train pairs --merge OUT.jsonl

MODEL_DIR is a full Qwen2.5-Omni checkpoint (a Talker stage's export, or the released one). PROMPTS.jsonl holds
conversations in Qwen2.5-Omni's message format whose last turn is the assistant reply to be spoken (media paths
relative to the file). For each: the Thinker runs once on the conversation (our data path: the same tokens, TMRoPE
positions and media features as training), the Talker samples K codec sequences in the training layout
(omni_train.model.talker; top-k / top-p / temperature as transformers' generate defaults), transformers' Token2Wav turns
each into a 24 kHz waveform, and a scorer rates each (lower is better). The best and the worst become the chosen and
rejected codes of a triplet, with their log-probs under the current model recorded as `ref_logps` (the DPO
reference is the model the pairs were sampled from, so `talker.reference=precomputed` needs no reference copy).
A prompt whose samples all score the same is set aside with that reason (they carry no preference).

Device and precision: each rank runs the model on its own GPU when CUDA is available (`--device auto`, the default;
cuda:LOCAL_RANK, torchrun's variable or srun's SLURM_LOCALID: omni_train/train/distributed.py's `local_gpu`), else
on the CPU, in bf16 on a GPU and fp32 on the CPU (`--precision auto`): the precision a talker_dpo stage computes
its policy's log-probs in on that device (`trainer.precision=auto`). The reference log-probs are computed and
recorded in it because DPO subtracts them from the policy's: at its first step the policy is the model the pairs
were sampled from, and the rewards start at 0 (the loss at ln 2) only as far as both sums of hundreds of codec
log-probs are computed alike; an fp32 reference under a bf16 policy would leave the policy's whole bf16 rounding
in every starting reward. Pair in the precision DPO will train in (`--precision fp32` for a GPU stage run with
`trainer.precision=fp32`). Token2Wav runs in fp32, as transformers' generate runs it. What goes into the triplet
comes back to the host once per prompt (the codes, the two log-probs; each waveform once, for its scorer); the
sampler reads one flag per step back, whether every sequence has stopped.

Scorers (`--scorer`), pluggable through `SCORERS`, built on omni_train/tools/scorers.py (shared with evaluation):
- `wer` (default): word error rate of a transcript against the reply text, plus the pause/duration check below.
  The transcript comes from `--asr`: `pocketsphinx` (default; PyPI's offline English recogniser), `thinker` (the
  model's own Thinker, asked to transcribe the clip) or a local Whisper checkpoint directory.
- `pauses`: the pause/duration check alone: the longest silence (20-ms frames under 1% of the peak RMS) beyond
  `--max-pause` seconds, and speaking time outside [0.04, 0.4] s per character of the reply, each add their excess
  in seconds (the paper ranks by word error rate and by punctuation/pause errors).
The output is a triplet JSONL (`speech: {chosen, rejected, speaker, ref_logps}`, and `scores`) that `omni-prep
build` turns into shards.

Parts, resume and merge (owned here): a process is rank R of N (torchrun's RANK/WORLD_SIZE, or srun's
SLURM_PROCID/SLURM_NTASKS: omni_train/train/distributed.py's `place`; no process group, the parts are independent)
and pairs the prompts whose index i (non-blank lines, from 0) has i % N == R. It appends one line per finished prompt
(its triplet, or its set-aside reason) to `OUT.part-R-of-N`, flushed and synced, after a header line recording the
settings (model fingerprint, prompts digest and count, sampling and scoring options, seed, device kind and
precision, N) and how many prompts the part holds. Prompt i is sampled under a seed of (seed, i) alone, so N ranks
give the triplets one process gives on the same kind of device.
Rerun, a rank skips the prompts its part holds (dropping a last line cut short by a kill); other settings are
refused. The rank that finds every part complete when it finishes writes OUT atomically in prompt order and prints
the report (prompts, triplets, each set-aside prompt with its reason); `--merge OUT` does the same alone, naming
any part missing or unfinished. Part files stay beside OUT: they are the resume state (remove them to start over).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data_prep.build import CODEC_IDS
from data_prep.chatml import SampleError
from omni_train.errors import ConfigError
from omni_train.files import atomic_writer, fingerprint, write_text_atomic
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
    eos/pad code (exclusive), sampled with a KV cache in the training layout and brought back to the host together;
    and the raw logits of every step (K, steps, vocabulary; on the talker's device), which equal the teacher-forced
    training forward's on the same codes (a test)."""
    from transformers import DynamicCache

    text, codec, pos, tail, first = prompt
    embed = talker.get_input_embeddings()
    inputs = text + torch.where((codec >= 0)[:, None], embed(codec.clamp(min=0)), 0.0)
    cache = DynamicCache()
    hidden = talker.model(inputs_embeds=talker.thinker_to_talker_proj(inputs)[None].expand(k, -1, -1),
                          position_ids=pos[:, None].expand(-1, k, -1), cache=cache, use_cache=True).last_hidden_state
    codes, raw, done = [], [], torch.zeros(k, dtype=torch.bool, device=text.device)
    for step in range(max_codes):
        logits = talker.codec_head(hidden[:, -1]).float()
        raw.append(logits)
        logits = logits / temperature
        logits[:, ids.bos] = -float("inf")  # as transformers' generate suppresses it
        # and no id past the codes but the stops: a triplet must hold what training reads (data_prep.build's
        # CODEC_IDS; an untrained Talker samples there, where transformers' generate would pass it to Token2Wav)
        stops = logits[:, [ids.eos, ids.pad]]
        logits[:, CODEC_IDS:] = -float("inf")
        logits[:, [ids.eos, ids.pad]] = stops
        code = _top_k_top_p(logits, top_k, top_p)
        codes.append(code)
        done |= (code == ids.eos) | (code == ids.pad)
        if done.all():  # the one value read back per step, as in transformers' generate
            break
        step_text = tail[step] if step < tail.shape[0] else pad_embed
        step_in = embed(code) + step_text
        position = (first + step).view(1, 1, 1).expand(3, k, 1)
        hidden = talker.model(inputs_embeds=talker.thinker_to_talker_proj(step_in)[:, None], position_ids=position,
                              cache=cache, use_cache=True).last_hidden_state
    stacked = torch.stack(codes, dim=1).cpu()
    out = []
    for row in stacked:
        stop = ((row == ids.eos) | (row == ids.pad)).nonzero()
        out.append(row[: int(stop[0]) if len(stop) else len(row)])
    return out, torch.stack(raw, dim=1)


def spoken_reply(objective, sample, speaker_bos: int, tokenizer):
    """One conversation whose last assistant turn is to be spoken: its packed batch (on the model's device), the
    reply's text, and what the Talker reads before its first code (and the tts_text_pad embedding), from the frozen
    Thinker."""
    from omni_train.data.batch import collate_packed, spoken, to_device

    batch = collate_packed([[sample]], len(sample), tokenizer.pad_token_id)
    place = spoken(sample, 0, 0)
    text = tokenizer.decode(batch["input_ids"][0, place.prompt:place.prompt + place.reply])
    batch = to_device({**batch, "spoken": [place], "speaker_bos": [speaker_bos]}, objective.talker.device)
    with torch.no_grad():
        (prompt,), pad_embed = objective.prompts(batch)
    return batch, text, prompt, pad_embed


def render(model, codes: torch.Tensor, voice: dict) -> np.ndarray:
    """Token2Wav's 24 kHz waveform of `codes` in the voice of a spk_dict entry, rendered on Token2Wav's device and
    brought back to the host."""
    device = model.token2wav.device
    with torch.no_grad():
        wave = model.token2wav(codes[None].to(device), conditioning=voice["cond"].to(device).float(),
                               reference_mel=voice["ref_mel"].to(device).float())
    return wave.reshape(-1).float().cpu().numpy()


def _top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    values, order = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    probs = values.softmax(dim=-1)
    keep = probs.cumsum(dim=-1) - probs < top_p  # the smallest prefix reaching top_p (at least one)
    probs = torch.where(keep, probs, 0.0)
    pick = torch.multinomial(probs / probs.sum(dim=-1, keepdim=True), 1)
    return order.gather(-1, pick).squeeze(-1)


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt `index`'s sampling (and of Token2Wav's noise): a function of (seed, index) alone, so a
    prompt gets the same candidates whichever rank takes it and whatever that rank did before."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:7], "little")


def load_speaker(model_dir: str, speaker: str | None = None, objective: str = "talker_sft",
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """transformers' full model of an export on `device`, in `dtype` (default: the export's, as transformers reads
    it) but for Token2Wav, in fp32 as transformers' generate runs it; the Talker's `objective` on it (our training
    layout) and the speaker's name (default: the first of its spk_dict.pt). An unknown speaker is a ConfigError
    naming the known ones."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    from omni_train.model.talker import TalkerLM

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(model_dir, **({"dtype": dtype} if dtype else {}))
    model.token2wav.float()
    model = model.to(device).eval()
    speakers = {name: int(v["bos_token"]) for name, v in model.speaker_map.items()}
    speaker = speaker or next(iter(speakers))
    if speaker not in speakers:
        raise ConfigError(f"speaker {speaker} is not in {model_dir}/spk_dict.pt (it has {sorted(speakers)})")
    return model, TalkerLM(model.thinker, model.talker, objective, speakers, speaker), speaker


class Pairer:
    """The model, its Talker objective, the voice and the scorer: prompt in, a triplet or a set-aside reason out."""

    def __init__(self, args):
        from omni_train.config.schema import Objective
        from omni_train.tokenizer import load_tokenizer
        from omni_train.train.distributed import local_gpu

        self.args = args
        device = local_gpu() if args.device == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)  # what allocates on "cuda" without an index lands here, as in training
        self.model, self.objective, self.speaker = load_speaker(args.model, args.speaker, Objective.talker_dpo, device,
                                                                PRECISIONS[args.precision])
        self.tokenizer = load_tokenizer(args.model)
        self.score = SCORERS[args.scorer](args, self.model, self.tokenizer)
        self.voice = self.model.speaker_map[self.speaker]
        self.base = Path(args.prompts).resolve().parent

    def pair(self, index: int, line: str) -> dict:
        """`{"triplet": ...}` for prompt `index` (one JSONL line), or `{"set_aside": {"id", "reason"}}`."""
        args, model, objective = self.args, self.model, self.objective
        rid = f"prompt-{index}"
        try:
            record = json.loads(line)
            rid = record.get("id", rid)
            sample = prepare_sample(record, self.base, self.tokenizer).sample
        except (SampleError, ValueError) as e:  # json's JSONDecodeError is a ValueError
            return {"set_aside": {"id": rid, "reason": str(e)}}
        torch.manual_seed(prompt_seed(args.seed, index))
        batch, text, prompt, pad_embed = spoken_reply(objective, sample, int(self.voice["bos_token"]),
                                                       self.tokenizer)
        with torch.no_grad():
            candidates, _ = sample_codes(model.talker, prompt, pad_embed, args.samples, args.max_codes, args.top_k,
                                         args.top_p, args.temperature, objective.ids)
            scored = [(self.score(render(model, codes, self.voice), text), codes) for codes in candidates
                      if len(codes) > 0]
        if len(scored) < 2 or min(s.value for s, _ in scored) == max(s.value for s, _ in scored):
            return {"set_aside": {"id": rid, "reason": f"{len(scored)} samples with no difference in score: "
                                                       f"no preference"}}
        scored.sort(key=lambda x: x[0].value)
        (best, chosen), (worst, rejected) = scored[0], scored[-1]
        ref = _reference_logps(objective, model, batch, chosen, rejected)
        return {"triplet": {"id": rid, "messages": absolute_media(record["messages"], self.base),
                            "use_audio_in_video": bool(record.get("use_audio_in_video", False)),
                            "speech": {"chosen": chosen.tolist(), "rejected": rejected.tolist(),
                                       "speaker": self.speaker, "ref_logps": ref},
                            "scores": {"chosen": best.value, "rejected": worst.value, "chosen_details": best.details,
                                       "rejected_details": worst.details, "samples": len(scored)}}}


# What a part's prompts were paired with (its header records them); a resume with other values would mix two
# experiments in one file. Paths are recorded but not compared: a copy of the model or the prompts elsewhere is
# the same (their fingerprint and digest say so). Device and precision as resolved from `auto` (`_resolve`).
SETTINGS = ("samples", "max_codes", "speaker", "scorer", "asr", "max_pause", "top_k", "top_p", "temperature", "seed",
            "device", "precision")
PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}
COMPARED = ("model_fingerprint", "prompts_sha256", *SETTINGS)


def _prompt_lines(path: str | Path):
    """(index, line) of each non-blank line of the prompts file, read as a stream."""
    with open(path) as f:
        index = 0
        for line in f:
            if line.strip():
                yield index, line
                index += 1


def _settings(args, world: int) -> dict:
    if not Path(args.model).is_dir():
        raise ConfigError(f"{args.model} is not a model directory")
    if not Path(args.prompts).is_file():
        raise ConfigError(f"{args.prompts} is not a file")
    digest, total = hashlib.sha256(), 0
    for _, line in _prompt_lines(args.prompts):
        digest.update(line.encode())
        total += 1
    return {"model": str(Path(args.model).resolve()), "model_fingerprint": fingerprint(args.model),
            "prompts": str(Path(args.prompts).resolve()), "prompts_sha256": digest.hexdigest(), "prompts_total": total,
            "world": world, **{k: getattr(args, k) for k in SETTINGS}}


def part_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.part-{rank}-of-{world}")


def _part_worlds(out: Path) -> dict[int, list[Path]]:
    """The part files next to `out`, by the number of ranks that wrote them."""
    found: dict[int, list[Path]] = {}
    for path in out.parent.glob(f"{glob.escape(out.name)}.part-*-of-*"):
        match = re.fullmatch(re.escape(out.name) + r"\.part-(\d+)-of-(\d+)", path.name)
        if match:
            found.setdefault(int(match[2]), []).append(path)
    return found


def _whole_lines(path: Path):
    """(byte offset of its end, bytes) of each line of a part file; a last line without its newline is not one (its
    rank was killed while writing it)."""
    end = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return
            end += len(line)
            yield end, line


def _header(path: Path) -> dict | None:
    """A part file's first line, its settings and size (None when there is no file)."""
    if not path.exists():
        return None
    return next((json.loads(line)["header"] for _, line in _whole_lines(path)), None)


def _scan(path: Path) -> tuple[dict | None, int, int]:
    """A part file's header, how many prompts it holds, and the byte length of its whole lines."""
    header, records, end = _header(path), 0, 0
    if header is not None:
        for records, (end, _) in enumerate(_whole_lines(path)):  # the header, then one line per prompt
            continue
    return header, records, end


def _unfinished(out: Path, world: int) -> tuple[list[dict], list[str]]:
    """The headers of `out`'s `world` parts, and one phrase per part that is missing or unfinished."""
    headers, problems = [], []
    for rank in range(world):
        path = part_path(out, rank, world)
        header, done, _ = _scan(path)
        if header is None:
            problems.append(f"{path.name} is missing")
        elif done < header["expected"]:
            problems.append(f"{path.name} is unfinished ({done} of {header['expected']} prompts)")
        headers.append(header)
    return headers, problems


def _different(old: dict, new: dict, new_name: str = "this run") -> list[str]:
    return [f"{k}={old.get(k)} ({new_name}: {k}={new[k]})" for k in COMPARED if old.get(k) != new[k]]


class RankProgress:
    """One line on stderr every `every` seconds while a rank pairs its prompts: done of its share, set aside, prompts
    per second this run, and an estimate of the time left at that rate."""

    def __init__(self, rank: int, world: int, done: int, expected: int, every: float):
        self.name, self.every = f"omni-train pairs: rank {rank} of {world}", every
        self.done, self.expected, self.set_aside, self.this_run = done, expected, 0, 0
        self.started = self.last = time.perf_counter()

    def advance(self, set_aside: bool) -> None:
        self.done, self.this_run, self.set_aside = self.done + 1, self.this_run + 1, self.set_aside + set_aside
        now = time.perf_counter()
        if now - self.last >= self.every or self.done == self.expected:
            rate = self.this_run / max(now - self.started, 1e-9)
            print(f"{self.name}: {self.done} of {self.expected} prompts, {self.set_aside} set aside this run, "
                  f"{rate:.2f} prompts/s, about {(self.expected - self.done) / rate:.0f} s left", file=sys.stderr,
                  flush=True)
            self.last = now


def build_part(args) -> dict | None:
    """This rank's part of the prompts (index % world == rank), resumed where its file stops; then, if every part
    is complete, the merge (the last rank to finish writes OUT). The merge's report, or None while parts remain."""
    from omni_train.train.distributed import place

    rank, world = place()
    out = Path(args.out)
    settings = _settings(args, world)
    for other, paths in _part_worlds(out).items():
        if other != world:
            raise ConfigError(f"{paths[0]} is a part of a {other}-rank run: run with {other} ranks, or remove "
                              f"{out.name}.part-* to start over")
    for other in range(world):  # any part made otherwise could not be merged with this one
        if (header := _header(part_path(out, other, world))) and (changed := _different(header, settings)):
            raise ConfigError(f"{part_path(out, other, world)} was made with {changed[0]}: run with its settings, "
                              f"or remove {out.name}.part-* to start over")
    path = part_path(out, rank, world)
    header, done, end = _scan(path)
    expected = len(range(rank, settings["prompts_total"], world))
    pairer = Pairer(args) if done < expected else None  # a wrong --speaker is refused before a header records it
    if header is None:
        write_text_atomic(path, json.dumps({"header": {**settings, "rank": rank, "expected": expected}}) + "\n")
    elif path.stat().st_size > end:
        os.truncate(path, end)  # the prompt in flight when the rank was killed: done again below
    if pairer is not None:
        if done:
            print(f"omni-train pairs: resuming {path}: {done} of {expected} prompts done", file=sys.stderr)
        progress = RankProgress(rank, world, done, expected, args.progress_every)
        with open(path, "a") as f:
            for index, line in _prompt_lines(args.prompts):
                if index % world != rank or index < rank + done * world:
                    continue
                result = pairer.pair(index, line)
                f.write(json.dumps({"index": index, **result}) + "\n")
                f.flush()
                os.fsync(f.fileno())  # a killed rank (or node) loses at most the prompt in flight
                progress.advance("set_aside" in result)
    _, problems = _unfinished(out, world)
    if problems:
        print(f"omni-train pairs: rank {rank} of {world}: {path} complete; waiting for other parts "
              f"({'; '.join(problems)}): the last rank to finish writes {out}, or run omni-train pairs --merge {out}",
              file=sys.stderr)
        return None
    return merge(out, args.out)


def merge(out: Path, shown: str | None = None) -> dict:
    """OUT from its complete parts, in prompt order, written atomically; every part must be there and complete, and
    all made with the same settings (one line naming what is not)."""
    worlds = _part_worlds(out)
    if len(worlds) != 1:
        raise ConfigError(f"no part files {out.name}.part-R-of-N next to {out}" if not worlds else
                          f"{out} has parts of runs with {sorted(worlds)} ranks: remove the stale ones")
    (world,) = worlds
    headers, problems = _unfinished(out, world)
    if problems:
        raise ConfigError(f"cannot merge {out}: {'; '.join(problems)}; run (or rerun) those ranks to finish them")
    for rank, header in enumerate(headers[1:], 1):
        if changed := _different(header, headers[0], part_path(out, 0, world).name):
            raise ConfigError(f"cannot merge {out}: {part_path(out, rank, world).name} was made with {changed[0]}")
    total, triplets, set_aside = headers[0]["prompts_total"], 0, []
    readers = [_whole_lines(part_path(out, rank, world)) for rank in range(world)]
    for reader in readers:
        next(reader)  # the header
    with atomic_writer(out, shared=True) as f:  # two ranks finishing at once may both merge
        for index in range(total):  # prompt i is in part i % world, each part in index order
            record = json.loads(next(readers[index % world])[1])
            if record["index"] != index:
                raise ConfigError(f"{part_path(out, index % world, world)} holds prompt {record['index']} where "
                                  f"prompt {index} belongs: remove it to redo that part")
            if "triplet" in record:
                f.write(json.dumps(record["triplet"]) + "\n")
                triplets += 1
            else:
                set_aside.append(record["set_aside"])
    return {"prompts": total, "triplets": triplets, "set_aside": set_aside, "out": shown or str(out)}


def _reference_logps(objective, model, batch: dict, chosen: torch.Tensor, rejected: torch.Tensor) -> list[float]:
    """log p(chosen), log p(rejected) under the current Talker, exactly as talker_dpo's loss computes them (in the
    model's precision; `batch` from spoken_reply, the codes on the host)."""
    from omni_train.data.batch import host_to_device
    from omni_train.model.kernels.attention import use_encoder_attention, use_packed_attention

    models = (model.talker.model, model.thinker.model.language_model)
    everything = (*models, model.thinker.model.audio_tower, model.thinker.model.visual)
    before = [m.config._attn_implementation for m in everything]
    for m in models:  # per-sequence attention over the packed chosen + rejected row, as in training
        use_packed_attention(m)
    use_encoder_attention(model.thinker)  # the encoders' attention as in training, too
    try:
        (place,) = batch["spoken"]
        row = objective.sequences({**batch, "codes": host_to_device(torch.cat([chosen, rejected]),
                                                                     batch["input_ids"].device),
                                   "spoken": [place._replace(chosen=len(chosen), rejected=len(rejected))]})
        logp = objective.token_logps(model.talker, row)
        return row.per_sequence(logp).tolist()
    finally:
        for m, name in zip(everything, before):
            m.config._attn_implementation_internal = name


def _resolve(args) -> None:
    """--device and --precision made definite: `auto` is the GPU when this process sees one, and bf16 there, fp32
    on the CPU."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this process sees no CUDA GPU; pair on the CPU with --device cpu")
    if args.precision == "auto":
        args.precision = "bf16" if args.device == "cuda" else "fp32"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omni-train pairs", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="a full Qwen2.5-Omni checkpoint directory (with spk_dict.pt)")
    parser.add_argument("prompts", nargs="?", help="JSONL conversations ending with the assistant reply to speak")
    parser.add_argument("out", nargs="?", help="the triplet JSONL to write")
    parser.add_argument("--merge", metavar="OUT", default=None,
                        help="only write OUT from its complete part files OUT.part-R-of-N")
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
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where each rank runs the model: auto (its GPU, cuda:LOCAL_RANK, when CUDA is available, "
                             "else the CPU), cpu or cuda")
    parser.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                        help="the model's precision, which the recorded reference log-probs are computed in: auto "
                             "(bf16 on a GPU, fp32 on the CPU, as talker_dpo trains with trainer.precision=auto)")
    parser.add_argument("--progress-every", type=float, default=30.0,
                        help="seconds between a rank's progress lines (prompts/s, set aside, time left)")
    parser.add_argument("--shards", metavar="DIR", default=None,
                        help="after the merge, prepare OUT into shards in DIR for talker_dpo (omni-prep build)")
    args = parser.parse_args(argv)
    if args.merge is not None and args.model is not None:
        parser.error("--merge OUT takes no MODEL_DIR PROMPTS.jsonl OUT.jsonl")
    if args.merge is None and args.out is None:
        parser.error("MODEL_DIR PROMPTS.jsonl OUT.jsonl are required (or --merge OUT)")
    if args.samples < 2:
        parser.error("--samples must be at least 2: a pair needs two candidates")
    if args.merge is None:
        _resolve(args)
    report = merge(Path(args.merge), args.merge) if args.merge is not None else build_part(args)
    if report is None:  # this rank's part is done; another rank's finish (or --merge) writes OUT
        return 0
    print(json.dumps(report, indent=2))
    if args.shards and report["triplets"]:
        from data_prep.build import build
        from data_prep.config import PrepConfig

        build(str(args.merge or args.out), args.shards, PrepConfig(), args.model, progress=False)
    return 0 if report["triplets"] else 1


if __name__ == "__main__":
    sys.exit(main())
