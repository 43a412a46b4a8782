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


def test_compile_mode_and_cuda_graph_flags():
    import argparse

    from convbert.cli import pretrain as cli
    from convbert.errors import ConvBertError
    from convbert.pretrain.config import COMPILE_MODES, resolve_config

    assert cli.COMPILE_MODES == COMPILE_MODES  # the CLI keeps its own copy so that --help does not load torch
    parser = argparse.ArgumentParser()
    cli._add_pretrain(parser.add_subparsers())
    args = parser.parse_args(["pretrain", "--compile-mode", "reduce-overhead", "--cuda-graphs"])
    assert args.compile_mode == "reduce-overhead" and args.cuda_graphs is True
    flags = cli.pretrain_flags(args)
    assert flags["compile"] is True and flags["cuda_graphs"] is True  # --compile-mode implies --compile
    base = dict(data="d", output="o", compile_mode="max-autotune", cuda_graphs=True)
    cfg = resolve_config("tiny", None, base, [])
    assert cfg.compile_mode == "max-autotune" and cfg.cuda_graphs is True and cfg.compile is False
    with pytest.raises(ConvBertError, match="compile_mode = 'fast': expected one of default, reduce-overhead"):
        resolve_config("tiny", None, dict(data="d", output="o"), ["compile_mode=fast"])


def test_the_defaults_pretrain_help_shows_are_the_ones_that_apply(tmp_path):
    """--help states the per-size defaults from its own copy (it must not load torch); each is what resolve_config
    gives that size, and --eval-batch-size reaches the config like the other flags."""
    import argparse

    from convbert.cli import pretrain as cli
    from convbert.pretrain.config import PretrainConfig, SIZE_DEFAULTS, resolve_config

    for key, per_size in cli.HELP_SIZE_DEFAULTS.items():
        assert per_size == {size: SIZE_DEFAULTS[size][key] for size in SIZE_DEFAULTS}, key
    base = PretrainConfig()
    assert (base.keep_checkpoints, base.eval_batches, base.save_every, base.eval_every) == (3, 50, 10_000, 10_000)
    assert (SIZE_DEFAULTS["tiny"]["save_every"], SIZE_DEFAULTS["tiny"]["eval_every"]) == (500, 500)
    parser = argparse.ArgumentParser()
    cli._add_pretrain(parser.add_subparsers())
    args = parser.parse_args(["pretrain", "--size", "tiny", "--data", "d", "--output", "o", "--eval-batch-size", "8"])
    assert resolve_config("tiny", None, cli.pretrain_flags(args), []).eval_batch_size == 8
    assert "tiny 0.001, small 0.0003, medium-small 0.0005, base 0.0002" in cli._by_size("lr")
