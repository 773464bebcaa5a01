"""`omni-demo`: the whole pipeline, on the tiny model and the sample corpus, 2 CPU processes.

Owns: the order of the demo's stages and `outputs/demo/summary.json` ({"stages": {NAME: {...}}} in the order the
stages ran, plus "data" for preparation and "init" for the composed sources). Each step is what a user would type
(`omni-prep sample`, `omni-prep build`, `omni-launch ...`); the demo adds nothing the command line cannot do.
Sample corpus -> media, text and speech-triplet shards -> tiny stand-ins for Qwen2.5 / Whisper / Qwen2.5-VL ->
stage 1 (composed Thinker, LLM frozen) -> stage 2 (everything) -> stage 3 (32k rows, 2 ranks sharing each row by
sequence parallelism) -> Thinker SFT -> Talker SFT (codec continuation on the frozen Thinker) -> Talker DPO (speech
triplets; LoRA adapters on the Talker, merged into the export), each stage starting from the previous stage's
export, all under ZeRO-3; the last export is a full Qwen2.5-Omni (Thinker, Talker, Token2Wav, spk_dict.pt) that
transformers' `Qwen2_5OmniForConditionalGeneration` loads. Every 8th conversation of each manifest is held out: every stage is evaluated on its held-out share before
its first step, every few steps and after its last (`eval_loss` first and last in each stage's summary); each Thinker
stage's export answers the held-out media and text conversations greedily (`answers` in the summary: word error rate
and exact match against the references, per modality); the final model speaks the held-out triplets' replies and a
recogniser scores them (`speech` in the summary: word error rate and pause penalty); `outputs/demo/report/` holds
the curves of all stages (`omni-train report`).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from launch.cli import launch
from omni_train.config.compose import compose
from omni_train.files import write_json_atomic, write_text_atomic
from omni_train.tools.answers import answers_task
from omni_train.tools.report import write as report
from omni_train.tools.speech import speech_task
from omni_train.tools.tiny_sources import write_tiny_sources

# conf/data/sample.yaml names both sources (weight 1 each); stages 1 and 2 choose their own mixture.
MEDIA = "{name:media,path:outputs/demo/shards/media,weight:%s}"
TEXT = "{name:text,path:outputs/demo/shards/text,weight:%s}"
TRIPLETS = "[{name:triplets,path:outputs/demo/shards/triplets}]"
HELD_OUT = 8  # every 8th conversation of each manifest is held out for evaluation
THINKER_STAGES = ("stage1_align", "stage2_multimodal", "stage3_long", "sft")
EVAL_THINKER = "eval.sources=[{name:media,path:outputs/demo/heldout/media},{name:text,path:outputs/demo/heldout/text}]"
EVAL_TALKER = "eval.sources=[{name:triplets,path:outputs/demo/heldout/triplets}]"
STAGES = [
    # (stage preset, overrides of its own); each stage after the first starts from the previous stage's export.
    # Stage 1 sees audio-text and image-text data only, as in the paper; later stages mix in text.
    ("stage1_align", ["trainer.max_steps=20", "trainer.lr=1e-2", "data.max_len=2048", f"data.sources=[{MEDIA % 1}]",
                      EVAL_THINKER, "trainer.eval_every=5"]),
    ("stage2_multimodal", ["trainer.max_steps=20", "trainer.lr=3e-3", "data.max_len=2048",
                           f"data.sources=[{MEDIA % 2},{TEXT % 1}]", EVAL_THINKER, "trainer.eval_every=5"]),
    ("stage3_long", ["trainer.max_steps=6", "trainer.lr=1e-3", "trainer.warmup_steps=1", "trainer.micro_batch_size=1",
                     "trainer.sequence_parallel=2", "data.chunk_samples=1024", EVAL_THINKER, "trainer.eval_every=3"]),
    ("sft", ["trainer.max_steps=30", "trainer.lr=3e-3", EVAL_THINKER, "trainer.eval_every=10",
             "trainer.keep_best=true"]),
    # The Talker on the SFT'd Thinker: codec continuation, then DPO on the speech triplets (Thinker frozen).
    ("talker_sft", ["trainer.max_steps=10", "trainer.lr=3e-3", "data.max_len=512", f"data.sources={TRIPLETS}",
                    EVAL_TALKER, "trainer.eval_every=5"]),
    # DPO with LoRA on the Talker (PEFT): the reference is the Talker with its adapters off; the export is merged.
    ("talker_dpo", ["trainer.max_steps=10", "trainer.lr=3e-3", "trainer.warmup_steps=0", "data.max_len=512",
                    f"data.sources={TRIPLETS}", EVAL_TALKER, "trainer.eval_every=5", "stage.lora.enabled=true",
                    "stage.lora.r=8"]),
]


def hold_out(manifest: Path, every: int = HELD_OUT) -> tuple[Path, Path]:
    """Split a manifest into NAME.train.jsonl and NAME.heldout.jsonl beside it (every `every`-th line held out;
    media paths stay relative to the same folder)."""
    lines = [line for line in manifest.read_text().splitlines() if line.strip()]
    train, held = manifest.with_suffix(".train.jsonl"), manifest.with_suffix(".heldout.jsonl")
    write_text_atomic(train, "".join(line + "\n" for i, line in enumerate(lines) if i % every != every - 1))
    write_text_atomic(held, "".join(line + "\n" for i, line in enumerate(lines) if i % every == every - 1))
    return train, held


def speak(export: Path, wav: Path) -> dict:
    """The last export as transformers loads it (Qwen2_5OmniForConditionalGeneration: Thinker + Talker +
    Token2Wav): answer a question in text and speech; the waveform (24 kHz) goes to `wav`."""
    import wave

    import numpy as np
    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration

    from omni_train.tokenizer import load_tokenizer

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(export).eval()
    tokenizer = load_tokenizer(str(export))
    prompt = "<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    torch.manual_seed(0)
    sequences, audio = model.generate(input_ids=ids, thinker_max_new_tokens=16, talker_max_new_tokens=200,
                                      speaker=next(iter(model.speaker_map)))
    samples = (audio.clamp(-1, 1).numpy() * 32767).astype(np.int16)
    tmp = wav.with_name(wav.name + ".tmp")
    with wave.open(str(tmp), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(24_000)
        f.writeframes(samples.tobytes())
    tmp.replace(wav)
    text = tokenizer.decode(sequences[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"omni-demo: the final model answers {text!r} and says it in {len(samples) / 24_000:.2f} s of audio: {wav}")
    return {"wav": str(wav), "seconds": len(samples) / 24_000, "text": text}


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="omni-demo", description=__doc__.split("\n\n")[0],
        epilog="Writes outputs/demo/ (removed first). Overrides apply to every stage (e.g. launcher.nproc_per_node=2).")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides added to every stage's command")
    argv = parser.parse_args(sys.argv[1:] if argv is None else argv).overrides

    from data_prep.build import build
    from data_prep.config import from_overrides
    from data_prep.sample import write_sample_corpus

    out = Path("outputs/demo")
    shutil.rmtree(out, ignore_errors=True)  # the demo always starts from nothing
    manifest = write_sample_corpus(out / "sample")
    summary: dict = {"data": {}, "stages": {}}
    for name in ("media", "text", "triplets"):
        train, held = hold_out(manifest.with_name(f"{name}.jsonl"))
        for source, shards in ((train, out / "shards" / name), (held, out / "heldout" / name)):
            print(f"omni-demo: data: omni-prep build {source} {shards}", flush=True)
            index = build(str(source), str(shards), from_overrides([]))
            summary["data"][shards.relative_to(out).as_posix()] = {
                "manifest": str(source), "shards": str(shards), "num_shards": len(index["shards"]), **index["totals"]}
    sources = write_tiny_sources(out / "init", compose(argv).model)
    summary["init"] = sources
    start = [f"model.compose.{role}={path}" for role, path in sources.items()]
    for stage, overrides in STAGES:
        run_dir = out / stage
        args = [f"stage={stage}", f"run_dir={run_dir}", "trainer.save_every=10", *start, *overrides,
                *argv]
        print(f"omni-demo: stage {stage}: omni-launch {' '.join(args)}", flush=True)
        code = launch(args)
        if code != 0:
            sys.exit(f"omni-demo: stage {stage} failed with exit code {code}; its logs are in {run_dir}")
        summary["stages"][stage] = json.loads((run_dir / "summary.json").read_text())
        start = [f"model.path={run_dir / 'export'}"]
    held = manifest.with_name("thinker.heldout.jsonl")  # the held-out media and text conversations
    write_text_atomic(held, "".join(manifest.with_name(f"{n}.heldout.jsonl").read_text() for n in ("media", "text")))
    summary["answers"] = {}
    for stage in THINKER_STAGES:
        answers = answers_task(str(out / stage / "export"), str(held), max_new_tokens=32)
        summary["answers"][stage] = {k: answers[k] for k in ("samples", "wer", "exact_match", "by_modality")}
        print(f"omni-demo: {stage}'s Thinker answers {answers['samples']} held-out conversations: word error rate "
              f"{answers['wer']:.3f}, exact match {answers['exact_match']:.3f}", flush=True)
    summary["speech"] = speak(out / "talker_dpo" / "export", out / "speech.wav")
    print("omni-demo: the final model speaks the held-out replies; pocketsphinx transcribes them", flush=True)
    spoken = speech_task(str(out / "talker_dpo" / "export"), str(manifest.with_name("triplets.heldout.jsonl")),
                         max_codes=200)
    summary["speech"].update({"heldout_wer": spoken["wer"], "heldout_pause_penalty": spoken["pause_penalty"],
                              "heldout_samples": spoken["samples"], "asr": spoken["asr"]})
    report_path = report([out / stage for stage, _ in STAGES], out / "report")
    summary["report"] = str(report_path)
    write_json_atomic(out / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    print(f"omni-demo: done; summary in {out / 'summary.json'}")


if __name__ == "__main__":
    main()
