"""The Thinker recipe: next-token cross-entropy on the Thinker (stages 1-3 and SFT; `stage.trainable` says which
parts train), with sequence parallelism, activation checkpointing and MLP tiling as configured; exports the Thinker
in the hub layout (`Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained` loads it); with `stage.lora`, LoRA on
the language model (by default) and, beside the merged export, the PEFT adapter directory."""

from __future__ import annotations

from pathlib import Path

from omni_train.config.schema import Attention, Config
from omni_train.data.loader import Speech
from omni_train.train.recipes.base import Trainee, base_path


class ThinkerRecipe:
    speech = Speech.none
    lora_targets = ["llm"]

    def check(self, cfg: Config) -> None:
        """model.path's config and weight headers against the model (omni_train.model.build.check_checkpoint)."""
        from omni_train.model.build import check_checkpoint

        check_checkpoint(cfg.model)

    def trainable_names(self, cfg: Config) -> list[str]:
        from omni_train.model.build import parameter_names

        return parameter_names(cfg.model, talker=False)

    def build(self, cfg: Config, world: int, sp=None) -> Trainee:
        """`sp`: the run's SequenceParallel (omni_train.model.kernels.attention), or None."""
        from omni_train.model.build import build_thinker
        from omni_train.model.keymap import hub_name
        from omni_train.model.kernels import activations
        from omni_train.model.kernels.attention import use_encoder_attention, use_packed_attention
        from omni_train.model.thinker import ThinkerLM
        from omni_train.train.engine import choose_trainable, deepspeed_config, initialize, training_dtype
        from omni_train.train.export import ADAPTER_DIR, export_adapter, export_pretrained

        ds_config = deepspeed_config(cfg, world)
        thinker = build_thinker(cfg.model, ds_config, training_dtype(cfg))
        activations.apply(thinker, cfg.trainer)
        sdpa = cfg.model.attn_implementation == Attention.sdpa
        if sdpa:
            use_encoder_attention(thinker)
        if sp is not None:
            sp.attach(thinker.model.language_model, cfg.trainer.micro_batch_size, str(cfg.model.attn_implementation))
        elif sdpa:
            use_packed_attention(thinker.model.language_model)
        module = ThinkerLM(thinker, sp, cfg.trainer.logits_chunk)
        lora = choose_trainable(module, cfg, self.lora_targets)
        engine, _, scheduler = initialize(cfg, module, ds_config)

        def export(out_dir, tokenizer) -> None:
            export_pretrained(module.thinker, out_dir, tokenizer, rename=hub_name)  # LoRA merged in
            if lora:
                export_adapter(module.thinker, Path(out_dir).with_name(ADAPTER_DIR), cfg.stage.lora,
                               base_path(cfg.model), rename=hub_name)

        return Trainee(engine, module, scheduler, export)

    def summary(self, history: dict[int, dict], first: int, last: int) -> dict:
        return {}
