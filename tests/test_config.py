"""A bad configuration is refused with one clear line before any process starts."""

import pytest

from tests.conftest import run_launch


@pytest.mark.parametrize(
    "override, message",
    [
        ("model=no_such_preset", "model/no_such_preset"),
        ("trainer.lrr=0.1", "lrr"),
        ("trainer.micro_batch_size=-2", "trainer.micro_batch_size=-2 must be a positive integer"),
        ("trainer.max_steps=abc", "max_steps"),
        ("data.max_len=250", "data.max_len=250 must be a positive multiple of data.pad_to_multiple_of=8"),
        ("model.path=/nonexistent/ckpt", "model.path=/nonexistent/ckpt is not a directory"),
        ("stage.trainable=[thinker.nonexistent.*]", "match no parameter"),
    ],
)
def test_bad_config_fails_with_one_clear_line(override, message, text_corpus, tmp_path):
    result = run_launch(override, f"data.train={text_corpus}", f"run_dir={tmp_path}/run", timeout=300)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
