"""The recipe files in configs/ resolve, and their model blocks agree with the presets (spec §2.1, §3.8)."""

from pathlib import Path

import pytest

from convbert.model.config import ConvBertConfig
from convbert.pretrain.config import SIZE_DEFAULTS, resolve_config
from convbert.pretrain.trainer import build_model_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_resolves_to_the_preset(path):
    cfg = resolve_config(None, str(path), {"data": "d", "output": "o"}, None)
    model = build_model_config(cfg, 30522, 128)
    preset = ConvBertConfig.from_preset(cfg.size, attention_type=cfg.attention)
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "embedding_size",
                  "num_groups", "head_ratio", "conv_kernel_size"):
        assert getattr(model, field) == getattr(preset, field), field
    if cfg.size != "tiny":
        d = SIZE_DEFAULTS[cfg.size]
        assert (cfg.lr, cfg.batch_size, cfg.steps, cfg.warmup_steps) == (d["lr"], d["batch_size"], 10**6, 10**4)
        assert abs(cfg.generator_fraction - d["generator_fraction"]) < 1e-9
