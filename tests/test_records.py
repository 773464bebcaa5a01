"""What a run writes is what happened: strict JSON (a non-finite figure is null, and flagged), and credentials
redacted by name without losing model settings that merely contain a credential's word."""

from __future__ import annotations

import json
import math

from omni_train.files import json_safe, write_json_atomic
from omni_train.train.metrics import Metrics, redact


def test_credentials_are_redacted_and_model_settings_are_kept():
    config = {"logging": {"wandb_api_key": "k1", "api_key": "k2", "hf_token": "k3", "password": "k4",
                          "wandb_project": "omni-train"},
              "model": {"hf_config": {"token2wav_config": {"dit_config": {"dim": 64}}, "pad_token_id": 0,
                                      "num_key_value_heads": 2}}}
    out = redact(config)
    assert all(out["logging"][k] == "<redacted>" for k in ("wandb_api_key", "api_key", "hf_token", "password"))
    assert out["logging"]["wandb_project"] == "omni-train"
    assert out["model"] == config["model"], "no model setting is lost to the filter"


def test_non_finite_figures_are_null_in_strict_json(tmp_path):
    assert json_safe({"a": [1.0, math.nan], "b": {"c": -math.inf}, "d": "x"}) == {"a": [1.0, None], "b": {"c": None},
                                                                                "d": "x"}
    path = write_json_atomic(tmp_path / "summary.json", {"last_loss": math.nan, "steps": 3})
    assert json.loads(path.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c))) == {
        "last_loss": None, "steps": 3}


def test_a_non_finite_step_is_logged_as_null_and_flagged(tmp_path):
    from omni_train.config.schema import LoggingConfig, WandbMode

    metrics = Metrics(LoggingConfig(wandb_mode=WandbMode.disabled, progress_bar=False), str(tmp_path), 0, 3, 0, {})
    metrics.log({"step": 1, "loss": math.nan, "lr": 1e-3, "tokens_per_s": math.inf, "grad_norm": 2.0})
    line = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    record = json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert record == {"step": 1, "loss": None, "lr": 1e-3, "tokens_per_s": None, "grad_norm": 2.0,
                      "nonfinite": ["loss", "tokens_per_s"]}
