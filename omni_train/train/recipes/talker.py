"""The Talker recipes: `talker_sft` (next codec token) and `talker_dpo` (DPO on speech triplets), both on the frozen
Thinker's states (omni_train.model.talker.TalkerLM). The Talker alone trains; for DPO with `talker.reference=model`
a frozen copy of the starting Talker scores the reference (ZeRO-3-partitioned like the rest), with `precomputed`
the shards carry its log-probs. Exports the full model (Thinker, Talker, Token2Wav, spk_dict.pt) that
`Qwen2_5OmniForConditionalGeneration.from_pretrained` loads. With `stage.lora`, LoRA on the Talker (by default);
talker_dpo's reference is then the Talker with its adapters off, and a PEFT adapter directory for the full model
goes beside the merged export."""

from __future__ import annotations

from pathlib import Path

from omni_train.config.schema import Attention, Config, Objective, Reference
from omni_train.data.loader import Speech
from omni_train.errors import ConfigError
from omni_train.train.recipes.base import Trainee, base_path


class TalkerRecipe:
    def __init__(self, objective: Objective):
        self.objective = objective
        self.speech = Speech.chosen if objective == Objective.talker_sft else Speech.pair
        self.lora_targets = ["talker"]

    def check(self, cfg: Config) -> None:
        t, talker = cfg.trainer, cfg.talker
        for ok, message in (
            (t.sequence_parallel == 1, f"trainer.sequence_parallel={t.sequence_parallel}: the Talker stages run "
                                       "without sequence parallelism (their sequences are short); set it to 1"),
            (talker.beta > 0, f"talker.beta={talker.beta} must be positive"),
            (talker.sft_weight >= 0, f"talker.sft_weight={talker.sft_weight} must be >= 0"),
        ):
            if not ok:
                raise ConfigError(message)
        from omni_train.model.build import check_checkpoint

        check_checkpoint(cfg.model, talker=True)

    def trainable_names(self, cfg: Config) -> list[str]:
        from omni_train.model.build import parameter_names

        return parameter_names(cfg.model, talker=True)

    def build(self, cfg: Config, world: int, sp=None) -> Trainee:
        from omni_train.model.build import build_talker, build_thinker, build_token2wav, load_speakers, omni_config
        from omni_train.model.kernels import activations
        from omni_train.model.kernels.attention import use_encoder_attention, use_packed_attention
        from omni_train.model.talker import TalkerLM
        from omni_train.train.engine import choose_trainable, deepspeed_config, initialize, training_dtype
        from omni_train.train.export import ADAPTER_DIR, export_adapter, export_omni, omni_layout

        # Token2Wav first, before any ZeRO-3 construction: once DeepSpeed's zero.Init has run in this process, it may
        # still partition parameters created later (Token2Wav is not trained and must stay whole for the export).
        token2wav = build_token2wav(cfg.model) if cfg.trainer.export else None
        ds_config, dtype = deepspeed_config(cfg, world), training_dtype(cfg)
        thinker = build_thinker(cfg.model, ds_config, dtype)
        talker, loaded = build_talker(cfg.model, ds_config, dtype)
        if self.objective == Objective.talker_dpo and not loaded:
            raise ConfigError(f"talker_dpo starts from a trained Talker, but model.path={cfg.model.path} holds none: "
                              "point it at a talker_sft export (or a released Qwen2.5-Omni checkpoint)")
        reference = None
        lora = cfg.stage.lora.enabled
        # With LoRA the reference is the Talker with its adapters off: no second copy of the weights.
        base_reference = lora and self.objective == Objective.talker_dpo and cfg.talker.reference == Reference.model
        if self.objective == Objective.talker_dpo and cfg.talker.reference == Reference.model and not lora:
            reference, _ = build_talker(cfg.model, ds_config, dtype)
        activations.checkpointing(talker, cfg.trainer)  # the Thinker runs without gradient: nothing to keep
        if cfg.model.attn_implementation == Attention.sdpa:
            use_encoder_attention(thinker)
            for model in (thinker.model.language_model, talker.model, *([reference.model] if reference else [])):
                use_packed_attention(model)
        voices = load_speakers(cfg.model, cfg.talker.speaker)
        speakers = {name: int(entry["bos_token"]) for name, entry in voices.items()}
        module = TalkerLM(thinker, talker, self.objective, speakers, cfg.talker.speaker, reference, cfg.talker.beta,
                          cfg.talker.sft_weight, cfg.trainer.logits_chunk, base_reference=base_reference)
        adapted = choose_trainable(module, cfg, self.lora_targets)
        stray = [n for n, p in module.named_parameters() if p.requires_grad and not n.startswith("talker.")]
        if stray:
            setting = "stage.lora.targets and train_fully select" if lora else "stage.trainable also matches"
            raise ConfigError(f"a Talker stage trains the Talker only; {setting} {stray[:3]}...: use patterns under "
                              "talker.")
        engine, _, scheduler = initialize(cfg, module, ds_config)

        def export(out_dir, tokenizer) -> None:
            # the whole spk_dict (Token2Wav's conditioning too) goes with the model; LoRA merged in
            export_omni(module.thinker, module.talker, token2wav, omni_config(cfg.model), voices, out_dir, tokenizer)
            if adapted:  # for Qwen2_5OmniForConditionalGeneration (the full model) as the base
                whole, rename = omni_layout(module.thinker, module.talker, None)
                export_adapter(whole, Path(out_dir).with_name(ADAPTER_DIR), cfg.stage.lora, base_path(cfg.model),
                               rename)

        return Trainee(engine, module, scheduler, export)

    def summary(self, history: dict[int, dict], first: int, last: int) -> dict:
        if self.objective != Objective.talker_dpo or first not in history or last not in history:
            return {}
        return {"first_reward_accuracy": history[first].get("dpo/reward_accuracy"),
                "last_reward_accuracy": history[last].get("dpo/reward_accuracy"),
                "last_margin": history[last].get("dpo/margin")}
