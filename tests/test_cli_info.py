import subprocess
import sys

from convbert.cli import main


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
