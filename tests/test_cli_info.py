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
