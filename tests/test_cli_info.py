import subprocess
import sys

import pytest
import torch

from convbert.cli import main
from convbert.optim import AdamWeightDecay


def test_info_prints_all_three_presets(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for text in ("ConvBERT-small", "ConvBERT-medium-small", "ConvBERT-base", "13,143,768", "17,475,888",
                 "105,680,520", "18,539,191", "2 / 2", "4 / 4", "6 / 6"):
        assert text in out


def test_info_one_size_as_module():
    out = subprocess.run([sys.executable, "-m", "convbert", "info", "--size", "small"], capture_output=True,
                         text=True, check=True).stdout
    assert "ConvBERT-small" in out and "ConvBERT-base" not in out


def test_bad_size_is_a_usage_error(capsys):
    try:
        main(["info", "--size", "huge"])
    except SystemExit as exit:
        assert exit.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_unknown_flag_is_reported_by_the_subcommand_on_one_line(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit:
        main(["info", "--size", "small", "--bogus", "3"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("convbert info: error: unrecognized arguments: --bogus 3") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit:
        main(["--bogus"])
    assert exit.value.code == 2 and capsys.readouterr().err.startswith("convbert: error: unrecognized arguments")


def test_a_size_given_twice_is_printed_once(capsys):
    assert main(["info", "--size", "tiny", "--size", "tiny"]) == 0
    assert capsys.readouterr().out.count("ConvBERT-tiny") == 1


def test_info_plain_attention_is_the_electra_baseline(capsys, transformers_module):
    """`--attention plain`: the baseline of the same size, as `pretrain --attention plain` trains it. Its
    discriminator has exactly transformers' ElectraModel's parameters, and ConvBERT-small costs less of both."""
    import json

    assert main(["info", "--size", "small", "--attention", "plain", "--json"]) == 0
    (plain,) = json.loads(capsys.readouterr().out)
    assert main(["info", "--size", "small", "--json"]) == 0
    (mixed,) = json.loads(capsys.readouterr().out)
    assert (plain["attention"], plain["conv_heads"], plain["sa_heads"]) == ("plain", 0, 4)
    electra = transformers_module.ElectraModel(transformers_module.ElectraConfig(
        vocab_size=30522, embedding_size=128, hidden_size=256, num_hidden_layers=12, num_attention_heads=4,
        intermediate_size=1024, max_position_embeddings=512))
    assert plain["discriminator_params"] == sum(p.numel() for p in electra.parameters())
    assert mixed["discriminator_params"] < plain["discriminator_params"]
    assert mixed["finetune_train_flops_per_token"] < plain["finetune_train_flops_per_token"]
    assert main(["info", "--size", "small", "--attention", "plain"]) == 0
    out = capsys.readouterr().out
    assert "small with plain attention (the ELECTRA-style baseline)" in out and "none / 1" in out


def test_info_kernels_reports_this_process_choices(capsys, monkeypatch):
    import json

    from convbert.model import kernels

    assert main(["info", "--kernels", "--json"]) == 0
    choices = json.loads(capsys.readouterr().out)
    assert choices == kernels.cpu_kernel_choices()
    assert choices["cpu_gemm"] in kernels.CPU_GEMMS and choices["threads"] >= 1
    w = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.ones(2)
    assert choices["optimizer_update"] == AdamWeightDecay([w], lr=1e-3).update_path([w])  # what a CPU step runs
    monkeypatch.setattr(kernels, "onednn_gelu_epilogue", not choices["onednn_gelu_epilogue"])
    assert main(["info", "--kernels"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(l for l in lines if l.split()[:1] == ["onednn_gelu_epilogue"])
    assert row.split()[1] == str(not choices["onednn_gelu_epilogue"])


def test_info_kernels_follows_the_gemm_override():
    import json
    import os

    env = dict(os.environ, CONVBERT_CPU_GEMM="blas")
    out = subprocess.run([sys.executable, "-m", "convbert", "info", "--kernels", "--json"], capture_output=True,
                         text=True, env=env, check=True).stdout
    assert json.loads(out)["cpu_gemm"] == "blas"


def test_top_level_help_gives_the_workflow_and_an_interrupted_resumable_command_says_how_to_continue(
        capsys, monkeypatch, tmp_path):
    import convbert.data.build as build
    from convbert.cli import main

    with pytest.raises(SystemExit) as stop:  # argparse prints the help and exits 0
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    order = [out.index(f"convbert {c} ") for c in ("train-vocab", "build-data", "pretrain", "export", "glue")]
    assert order == sorted(order) and "convbert quickstart" in out

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "build_dataset", interrupted)
    (tmp_path / "c.txt").write_text("a b\n")
    (tmp_path / "v.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nb\n")
    rc = main(["build-data", "--input", str(tmp_path / "c.txt"), "--vocab", str(tmp_path / "v.txt"), "--output",
               str(tmp_path / "d")])
    assert rc == 130
    assert capsys.readouterr().err.strip() == ("convbert build-data: interrupted; re-run the same command to continue "
                                               "(finished shards are kept)")


def test_progress_bars_in_a_log_file_are_plain_lines_not_carriage_return_frames(capsys, monkeypatch):
    """Where stderr is not a terminal (a batch job's log) the fine-tuning, GLUE and build-data bars write at most
    one plain line a minute; a transient bar writes nothing; Jupyter keeps its notebook bar."""
    import sys
    import types

    from convbert.utils import interactive_stderr, progress_bar

    assert not interactive_stderr()  # pytest's captured stderr
    with progress_bar(total=5, unit="step", desc="fine-tuning") as bar:
        for _ in range(5):
            bar.update(1)
    err = capsys.readouterr().err
    assert "\r" not in err and err.strip().splitlines()[-1].startswith("fine-tuning: 100%")
    assert "5/5 [" in err and ", ETA 00:00," in err.strip().splitlines()[-1]  # the remaining time, named
    with progress_bar(unit="doc", desc="reading") as bar:  # no total: no made-up ETA
        bar.update(2)
    assert "ETA" not in capsys.readouterr().err
    with progress_bar(total=3, unit="ex", leave=False, desc="predicting") as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert interactive_stderr()


def test_flags_are_not_abbreviated(capsys):
    """argparse's prefix matching read `glue --seed 3` as `--seeds 3`: three runs instead of seed 3."""
    with pytest.raises(SystemExit) as exit_info:
        main(["glue", "--model", "m", "--glue-dir", "g", "--output", "o", "--seed", "3"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --seed 3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--dat", "d", "--output", "o"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --dat d" in capsys.readouterr().err


def test_building_the_parser_loads_no_torch_and_info_lists_every_preset():
    """`convbert --help` took 2 s (info's presets imported the model package, hence torch); a Ctrl-C during that
    import printed a traceback."""
    from convbert.cli.info import PRESET_NAMES
    from convbert.model.config import PRESETS

    assert set(PRESET_NAMES) == set(PRESETS) and len(PRESET_NAMES) == len(PRESETS)
    code = "import sys; from convbert.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_closed_pipe_on_stdout_ends_quietly(capsys, monkeypatch):
    """`convbert info --json | head -1` printed `error: Broken pipe` and exited 2."""
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["info", "--json"]) == 141
    assert capsys.readouterr().err == ""


def test_an_interrupted_command_leaves_no_empty_output_folder(tmp_path, capsys, monkeypatch):
    import convbert.finetune.runner as runner

    def interrupted(opts):
        opts.output.mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_glue", interrupted)
    out = tmp_path / "g1"
    assert main(["glue", "--model", str(tmp_path), "--glue-dir", str(tmp_path), "--output", str(out)]) == 130
    assert "interrupted; re-run the same command to continue" in capsys.readouterr().err
    assert not out.exists()
