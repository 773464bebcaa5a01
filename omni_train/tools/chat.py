"""`omni-train chat EXPORT`: talk to a trained model; text and media files in, the answer's text out, and with a
full model its speech as a WAV.

    omni-train chat EXPORT --prompt TEXT [--audio FILE] [--image FILE] [--video FILE] [--system TEXT]
                           [--max-new-tokens N] [--wav OUT.wav [--speaker NAME]]
    omni-train chat EXPORT [...]            interactive: one user turn per line of stdin, history kept

EXPORT is a training export (RUN_DIR/export): a Thinker, or the full model (Thinker + Talker + Token2Wav +
spk_dict.pt) of a Talker stage. Each user turn is its media parts (audio, then images, then videos, each in the
order given) followed by its text. The answer is the Thinker's greedy one through our data path, exactly as `omni-train
eval --answers` computes it (omni_train/tools/answers.py); `--wav` (a full export) has the Talker speak it in the
voice `--speaker` (a key of spk_dict.pt; default its first), sampled with `--seed` as `eval --speech` does
(omni_train/tools/speech.py), and writes Token2Wav's 24 kHz waveform.

Interactive mode (no `--prompt`): each line of stdin is a user turn, answered on stdout; `/audio PATH`, `/image PATH`
and `/video PATH` lines attach a file to the next turn (the `--audio/--image/--video` files go with the first); an
empty line or end of input ends the conversation. With `--wav OUT.wav`, turn N's speech goes to OUT-N.wav.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omni_train.errors import ConfigError

KINDS = ("audio", "image", "video")
# Stands in for the reply to come: the answer is generated from the tokens before it (omni_train/tools/answers.py).
PENDING = {"role": "assistant", "content": "x"}


def user_turn(text: str, media: dict[str, list[str]]) -> dict:
    """A user message in Qwen2.5-Omni's format: the media parts (absolute paths), then the text."""
    parts = [{"type": kind, kind: str(Path(path).resolve())} for kind in KINDS for path in media.get(kind, ())]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}] if parts else text}


class Chat:
    """An export loaded once: `reply(messages)` answers a conversation ending with a user turn, `say(messages)`
    speaks one ending with an assistant turn (a full export only)."""

    def __init__(self, export: str, speech: bool, speaker: str | None, max_new_tokens: int, max_codes: int):
        from omni_train.tokenizer import load_tokenizer
        from omni_train.tools.answers import load_thinker

        self.tokenizer = load_tokenizer(export)
        self.max_new_tokens, self.max_codes = max_new_tokens, max_codes
        if speech:
            from omni_train.tools.pairs import load_speaker

            self.model, self.objective, self.speaker = load_speaker(export, speaker)
            self.thinker = self.model.thinker
        else:
            self.thinker = load_thinker(export)

    def _prepared(self, messages: list[dict]):
        from data_prep.chatml import SampleError
        from omni_train.tools.conversation import prepare_sample

        try:
            return prepare_sample({"messages": messages}, Path.cwd(), self.tokenizer)
        except SampleError as e:  # an unreadable or too long medium: the user's input
            raise ConfigError(str(e)) from None

    def reply(self, messages: list[dict]) -> str:
        from omni_train.tools.answers import answer

        return answer(self.thinker, self.tokenizer, self._prepared([*messages, PENDING]), self.max_new_tokens)[0]

    def say(self, messages: list[dict]):
        """Token2Wav's 24 kHz waveform of the last assistant turn (empty when the Talker stops at once)."""
        from omni_train.tools.speech import speak

        return speak(self.model, self.objective, self.speaker, self._prepared(messages).sample, self.tokenizer,
                     self.max_codes)[1]


def _write_wav(chat: Chat, messages: list[dict], path: Path) -> None:
    import soundfile

    from omni_train.tools.scorers import SAMPLE_RATE

    if not messages[-1]["content"].strip():
        print(f"omni-train chat: the answer is empty, nothing to speak; {path} not written", file=sys.stderr)
        return
    wave = chat.say(messages)
    if wave.size == 0:
        print(f"omni-train chat: the Talker produced no speech; {path} not written", file=sys.stderr)
        return
    soundfile.write(path, wave, SAMPLE_RATE)
    print(f"omni-train chat: speech written to {path} ({wave.size / SAMPLE_RATE:.2f} s)", file=sys.stderr)


def _check(args) -> None:
    config = Path(args.export) / "config.json"
    if not config.is_file():
        raise ConfigError(f"{args.export} has no config.json: give a training export (RUN_DIR/export)")
    full = "Qwen2_5OmniForConditionalGeneration" in (json.loads(config.read_text()).get("architectures") or [])
    if args.wav and not full:
        raise ConfigError(f"{args.export} is a Thinker export: --wav needs a full model (Thinker + Talker + "
                          "Token2Wav, a talker_sft or talker_dpo export)")
    for kind in KINDS:
        for path in getattr(args, kind):
            if not Path(path).is_file():
                raise ConfigError(f"--{kind} {path}: no such file")


def _interactive(chat: Chat, messages: list[dict], media: dict[str, list[str]], wav: str | None) -> None:
    ask = sys.stdin.isatty()
    turn = 0
    while True:
        if ask:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        line = line.rstrip("\n")
        command, _, path = line.partition(" ")
        if command.lstrip("/") in KINDS and command.startswith("/"):
            if not Path(path).is_file():
                print(f"omni-train chat: {path}: no such file", file=sys.stderr)
            else:
                media.setdefault(command[1:], []).append(path)
            continue
        turn_media, media = media, {}
        try:
            text = chat.reply([*messages, user_turn(line, turn_media)])
        except ConfigError as e:  # this turn's media: say so and go on with the conversation as it was
            print(f"omni-train chat: error: {e}", file=sys.stderr)
            continue
        messages += [user_turn(line, turn_media), {"role": "assistant", "content": text}]
        print(text, flush=True)
        turn += 1
        if wav:
            _write_wav(chat, messages, Path(wav).with_name(f"{Path(wav).stem}-{turn}{Path(wav).suffix}"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="omni-train chat", description=__doc__.split("\n\n")[0],
        epilog="Example: omni-train chat outputs/demo/talker_dpo/export --prompt 'What is said?' --audio q.wav "
               "--wav answer.wav")
    parser.add_argument("export", help="a training export (RUN_DIR/export): a Thinker or a full model")
    parser.add_argument("--prompt", help="the user's text; without it, read one turn per line of stdin")
    for kind in KINDS:
        parser.add_argument(f"--{kind}", action="append", default=[], metavar="FILE",
                            help="a file for the (first) user turn; repeatable")
    parser.add_argument("--system", help="a system message opening the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer at most (default: 128)")
    parser.add_argument("--wav", metavar="OUT.wav", help="speak the answer into this file (a full export)")
    parser.add_argument("--speaker", default=None, help="a key of the export's spk_dict.pt (default: its first)")
    parser.add_argument("--max-codes", type=int, default=600, help="speech codes at most (50 per second)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Talker's sampling (default: 0)")
    args = parser.parse_args(argv)
    try:
        _check(args)
        import torch

        torch.manual_seed(args.seed)
        chat = Chat(args.export, bool(args.wav), args.speaker, args.max_new_tokens, args.max_codes)
        messages = [{"role": "system", "content": args.system}] if args.system else []
        media = {kind: getattr(args, kind) for kind in KINDS}
        if args.prompt is None:
            _interactive(chat, messages, media, args.wav)
            return 0
        messages.append(user_turn(args.prompt, media))
        messages.append({"role": "assistant", "content": chat.reply(messages)})
        print(messages[-1]["content"], flush=True)
        if args.wav:
            _write_wav(chat, messages, Path(args.wav))
    except ConfigError as e:
        print(f"omni-train chat: error: {e}", file=sys.stderr)
        return 2
    return 0
