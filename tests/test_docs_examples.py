"""The Python examples in the README and the docs run as written.

Each file's ```python blocks run in order, as one script, in a fresh folder (in a child process, so that a block
cannot lean on this process's imports or state). A renamed function, a changed signature or a wrong output path in
the docs fails here. The checks after each run look at what the examples claim to produce.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_finetune_data import write_glue

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(doc: str) -> list[str]:
    return BLOCK.findall((ROOT / doc).read_text(encoding="utf-8"))


def run_blocks(doc: str, cwd: Path, timeout: int = 600) -> str:
    blocks = python_blocks(doc)
    assert blocks, f"{doc} has no ```python blocks"
    script = cwd / "doc_example.py"
    script.write_text("\n\n".join(blocks), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{doc}'s Python examples failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_the_block_reader_finds_every_python_block_and_only_those():
    assert len(python_blocks("docs/python-api.md")) == 6
    assert len(python_blocks("README.md")) == 1
    assert all("convbert" in b for b in python_blocks("docs/python-api.md"))


def test_readme_python_example(tmp_path):
    run_blocks("README.md", tmp_path)
    config = json.loads((tmp_path / "my-convbert" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (384, 12)
    assert (tmp_path / "my-convbert" / "model.safetensors").stat().st_size > 17_000_000 * 4


def test_data_reading_example(tmp_path):
    from convbert.data import build_dataset

    corpus = tmp_path / "corpus.txt"
    words = "the cat sat on the mat and the dog ran after it".split()
    corpus.write_text("\n\n".join(" ".join(words[i % 5:] + words[: i % 5]) + " ." for i in range(400)) + "\n")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *sorted(set(words))]) + "\n")
    build_dataset([str(corpus)], str(vocab), str(tmp_path / "data"), progress=False)
    run_blocks("docs/data.md", tmp_path)


@pytest.mark.slow
def test_python_api_walkthrough(tmp_path, transformers_module):
    write_glue(tmp_path / "glue_data", n_train=24, n_dev=8)
    out = run_blocks("docs/python-api.md", tmp_path)
    work = tmp_path / "work"
    for path in ("vocab.txt", "data/manifest.json", "data/eval/manifest.json", "run/run_config.json",
                 "model/config.json", "model/vocab.txt", "copy/model.safetensors", "classifier/head.json",
                 "own-task/finetune_task.json", "pred.csv",
                 "glue/results.md", "glue/runs/rte-seed2.json", "glue/runs/sts-seed1.json"):
        assert (work / path).is_file(), path
    # the pre-training ran its 40 steps and evaluated; transformers reads the export and agrees with ours
    assert re.search(r"^40 0\.\d+$", out, re.M), out
    # the second run started from the export: its step-0 evaluation is the first run's last one, to the bit
    assert json.loads((work / "run2" / "run_config.json").read_text())["pretrain"]["init_from"] == "work/model"

    def evals(run):
        records = [json.loads(line) for line in (work / run / "log.jsonl").read_text().splitlines()]
        return [r for r in records if r.get("kind") == "eval"]

    first, second = evals("run")[-1], evals("run2")[0]
    assert second["step"] == 0 and first["step"] == 40
    assert (second["disc_auc"], second["masked_lm_accuracy"]) == (first["disc_auc"], first["masked_lm_accuracy"])
    diff = float(re.search(r"max \|ours - transformers\| = (\S+)", out).group(1))
    assert diff < 1e-5
    assert "torch.Size([1, 5, 64])" in out
    # the file-based own task: as many predictions as training rows, with the text kept beside each
    n = re.search(r"^(\d+) examples; (\d+) predictions$", out, re.M)
    assert n and n.group(1) == n.group(2) and int(n.group(1)) > 100, out
    assert (work / "pred.csv").read_text().splitlines()[0] == "index,text,label,prob_original,prob_shuffled"
    config = json.loads((work / "model" / "config.json").read_text())
    heads = config["num_attention_heads"] // config["head_ratio"]
    assert f"{config['num_hidden_layers']} torch.Size([1, {heads}, 5, 5])" in out  # the attentions line
    saliency = re.search(r"^tensor\(\[\[([^\]]*)\]\]\)$", out, re.M)  # one positive norm per token
    assert saliency and len(saliency.group(1).split(",")) == 5, out
    assert all(float(x) > 0 for x in saliency.group(1).split(",")), out
    results = json.loads((work / "glue" / "results.json").read_text())
    assert set(results["tasks"]) == {"rte", "sts"}
    assert "the paper's average still needs" in out
