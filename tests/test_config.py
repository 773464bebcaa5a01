"""A bad configuration is refused with one clear line before any process starts."""

import pytest

from tests.conftest import data_args, run_launch


@pytest.mark.parametrize(
    "override, message",
    [
        ("model=no_such_preset", "model/no_such_preset"),
        ("trainer.lrr=0.1", "lrr"),
        ("trainer.micro_batch_size=-2", "trainer.micro_batch_size=-2 must be a positive integer"),
        ("trainer.max_steps=abc", "max_steps"),
        ("data.max_len=250", "data.max_len=250 must be a positive multiple of data.pad_to_multiple_of=64"),
        ("data.sources=[{name:x,path:/no/such/shards}]", "data source x: /no/such/shards does not exist"),
        ("data.sources=[{name:x,path:/tmp,weight:-1}]", "data source x: weight=-1.0 must be positive"),
        ("model.path=/nonexistent/ckpt", "model.path=/nonexistent/ckpt is not a directory"),
        ("stage.trainable=[thinker.nonexistent.*]", "match no parameter"),
    ],
)
def test_bad_config_fails_with_one_clear_line(override, message, text_shards, tmp_path):
    defaults = [a for a in data_args(text_shards) if a.split("=")[0] != override.split("=")[0]]
    result = run_launch(*defaults, override, f"run_dir={tmp_path}/run", timeout=300)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
