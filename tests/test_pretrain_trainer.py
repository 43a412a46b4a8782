"""The pre-training loop on a tiny real dataset: loss goes down, exact resume, checkpoints, config, export."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from convbert.errors import ConvBertError
from convbert.pretrain import checkpoint as ckpt_io
from convbert.pretrain.config import resolve_config
from convbert.pretrain.logging import read_log
from convbert.pretrain.trainer import build_model_config, run_pretraining


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from convbert.pretrain.quickstart import prepare_data

    root = tmp_path_factory.mktemp("pt_data")
    info = prepare_data(root, max_chars=120_000, vocab_size=600, max_seq_length=32, progress=False)
    return info


def cfg_for(data, out, **flags):
    base = dict(data=str(data["data"]), output=str(out), steps=6, batch_size=8, eval_every=0, eval_batches=2,
                save_every=3, threads=1, log_every=1)
    base.update(flags)
    sets = base.pop("sets", [])
    return resolve_config("tiny", None, base, sets)


def losses(run):
    return [r["loss"] for r in read_log(Path(run) / "log.jsonl") if r["kind"] == "train"]


def final_weights(run):
    latest = ckpt_io.latest_checkpoint(Path(run) / "checkpoints")
    return load_file(str(latest / "model.safetensors")), latest


def test_resume_is_bit_exact(tiny_data, tmp_path):
    full = tmp_path / "full"
    run_pretraining(cfg_for(tiny_data, full), progress=False)
    part = tmp_path / "part"
    r1 = run_pretraining(cfg_for(tiny_data, part, stop_at_step=3), progress=False)
    assert r1["step"] == 3 and not r1["finished"]
    # re-running the same command continues from the latest checkpoint
    r2 = run_pretraining(cfg_for(tiny_data, part), progress=False)
    assert r2["resumed"] and r2["finished"] and r2["step"] == 6
    la, lb = losses(full), losses(part)
    assert len(la) == len(lb) == 6
    assert la == lb  # bit-exact floats from the JSONL
    wa, ca = final_weights(full)
    wb, cb = final_weights(part)
    assert ca.name == cb.name == "step-00000006"
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    oa, ob = load_file(str(ca / "optimizer.safetensors")), load_file(str(cb / "optimizer.safetensors"))
    for k in oa:
        assert torch.equal(oa[k], ob[k]), k
    # the state records step, schedule, rng and data cursor
    st = json.loads((cb / "trainer_state.json").read_text())
    assert st["step"] == 6 and st["lr_schedule"]["total_steps"] == 6 and st["loader"][0]["position"] > 0
    assert st["run_config"]["model_config"]["hidden_size"] == 64
    # a finished run re-run is a no-op
    assert run_pretraining(cfg_for(tiny_data, part), progress=False)["step"] == 6


def test_resuming_on_another_thread_count_says_so(tiny_data, tmp_path, capsys):
    """--threads is a machine setting, not resumed; the CPU kernels' sums depend on it, so a resume on another
    count is not bit-exact and the trainer says how to make it so."""
    before = torch.get_num_threads()
    run = tmp_path / "run"
    try:
        run_pretraining(cfg_for(tiny_data, run, stop_at_step=3, threads=1), progress=False)
        state = json.loads((ckpt_io.latest_checkpoint(run / "checkpoints") / "trainer_state.json").read_text())
        assert state["cpu_threads"] == 1
        printed: list[str] = []
        run_pretraining(cfg_for(tiny_data, run, stop_at_step=4, threads=2), progress=False, log=printed.append)
        assert any("written with 1 CPU thread, now 2" in p and "--threads 1 resumes it bit for bit" in p
                   for p in printed), printed
        # the same command would stop at the same step again: the message says what continues
        captured = capsys.readouterr()
        assert ("stopped at step 4 of 6 (--stop-at-step); re-run without --stop-at-step (or with a later one)"
                in captured.out + captured.err)
        printed.clear()  # step 4 was written with 2 threads: resuming on 2 is quiet
        run_pretraining(cfg_for(tiny_data, run, threads=2), progress=False, log=printed.append)
        assert not any("CPU threads" in p for p in printed) and any("resumed from" in p for p in printed), printed
        printed.clear()  # --threads left out (0, torch's choice) is not a changed setting
        run_pretraining(cfg_for(tiny_data, run, threads=0), progress=False, log=printed.append)
        assert not any("threads 2 -> 0" in p for p in printed), printed
        # written by another world size: the random streams restart, so no thread count makes it bit-exact
        other = tmp_path / "other"
        run_pretraining(cfg_for(tiny_data, other, stop_at_step=3, threads=1), progress=False)
        state_file = ckpt_io.latest_checkpoint(other / "checkpoints") / "trainer_state.json"
        state = json.loads(state_file.read_text())
        state["world_size"] = 2
        state_file.write_text(json.dumps(state))
        printed.clear()
        run_pretraining(cfg_for(tiny_data, other, stop_at_step=4, threads=2), progress=False, log=printed.append)
        assert any("written by 2 rank(s), now 1" in p for p in printed), printed
        assert not any("bit for bit" in p for p in printed), printed
    finally:
        torch.set_num_threads(before)


def test_a_run_resumes_on_moved_data_but_not_on_other_data(tiny_data, tmp_path):
    """The run records a fingerprint of its training data: a copied or moved dataset resumes, another one (same
    vocab and size, other examples) is refused instead of silently training the rest of the run on it."""
    import shutil

    from convbert.data import build_dataset

    data = Path(tiny_data["data"])
    moved = shutil.copytree(data, tmp_path / "moved")
    other = tmp_path / "other"
    build_dataset([str(Path(tiny_data["corpus"]) / "train.txt")], str(tiny_data["vocab"]), str(other),
                  max_seq_length=32, seed=7, progress=False)
    shutil.copytree(data / "eval", other / "eval")
    run = tmp_path / "run"
    run_pretraining(cfg_for(tiny_data, run, stop_at_step=3), progress=False)
    saved = json.loads((run / "run_config.json").read_text())["data_fingerprint"]
    assert isinstance(saved, str) and len(saved) == 16
    with pytest.raises(ConvBertError, match=r"started on other training data than --data .*other"):
        run_pretraining(cfg_for({**tiny_data, "data": other}, run), progress=False)
    # the same examples, but part of them now held out for evaluation (no eval/ folder beside them)
    no_eval = shutil.copytree(data, tmp_path / "no_eval", ignore=shutil.ignore_patterns("eval"))
    with pytest.raises(ConvBertError, match=r"trained on --data less no held-out examples \(a separate --eval-data "
                                            r"set, or none\), this invocation on --data less \d+ held-out examples"):
        run_pretraining(cfg_for({**tiny_data, "data": no_eval}, run), progress=False)
    resumed = run_pretraining(cfg_for({**tiny_data, "data": moved}, run), progress=False)
    assert resumed["resumed"] and resumed["finished"]
    full = tmp_path / "full"
    run_pretraining(cfg_for(tiny_data, full), progress=False)
    assert losses(run) == losses(full)


def test_loss_decreases_and_eval_metrics(tiny_data, tmp_path):
    out = tmp_path / "run"
    res = run_pretraining(
        cfg_for(tiny_data, out, steps=60, batch_size=16, save_every=60, eval_every=30, eval_batches=4, lr=2e-3,
                warmup_steps=5),
        progress=False,
    )
    ls = losses(out)
    first, last = sum(ls[:8]) / 8, sum(ls[-8:]) / 8
    assert last < first * 0.8, (first, last)
    evals = [r for r in read_log(out / "log.jsonl") if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 30, 60]
    for key in ("masked_lm_loss", "masked_lm_accuracy", "sampled_masked_lm_accuracy", "disc_loss", "disc_auc",
                "disc_accuracy", "disc_precision", "disc_recall"):
        assert key in evals[-1]
    assert evals[-1]["disc_auc"] > evals[0]["disc_auc"]
    assert res["eval"]["disc_auc"] == evals[-1]["disc_auc"]
    assert (out / "curves.png").stat().st_size > 1000
    # TensorBoard (written from a background thread): every step's scalars, in order, and the evaluations
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tb_loss = events.Scalars("train/loss")
    assert [e.step for e in tb_loss] == list(range(1, 61))
    assert [e.value for e in tb_loss] == pytest.approx(ls, rel=1e-6)
    assert [e.step for e in events.Scalars("eval/disc_auc")] == [0, 30, 60]
    run_cfg = json.loads((out / "run_config.json").read_text())
    assert run_cfg["pretrain"]["lr"] == 2e-3 and run_cfg["max_predictions_per_seq"] == int(0.155 * 32)
    # milestones kept (6.25/12.5/25/50/100 % of 60 -> 4, 8, 15, 30, 60)
    steps = [s for s, _ in ckpt_io.list_checkpoints(out / "checkpoints")]
    assert {4, 8, 15, 30, 60} <= set(steps)


def test_export_loads_in_transformers(tiny_data, tmp_path):
    from convbert.pretrain.export import export_checkpoint

    run = tmp_path / "run"
    # 8 heads: the generator gets 2, which transformers can represent (a 1-head generator it cannot, spec §1.6)
    run_pretraining(cfg_for(tiny_data, run, steps=2, save_every=2, sets=["model.num_attention_heads=8"]),
                    progress=False)
    out = tmp_path / "export"
    info = export_checkpoint(run, out, generator=True)
    assert info["step"] == 2 and info["notes"] == []
    assert (out / "vocab.txt").read_text() == Path(tiny_data["vocab"]).read_text()
    assert (out / "generator" / "vocab.txt").is_file()
    from convbert.model.modeling import ConvBertModel

    ours = ConvBertModel.from_pretrained(out)
    ids = torch.randint(5, 600, (2, 32))
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = ours(ids, attention_mask=mask).last_hidden_state
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    hf = transformers.ConvBertModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        got = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(ref, got, atol=1e-4)
    gen = transformers.ConvBertForMaskedLM.from_pretrained(str(out / "generator")).eval()
    with torch.no_grad():
        logits = gen(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (2, 32, 600) and torch.isfinite(logits).all()
    # the generator's MLM logits equal ours (encoder + tied head)
    from convbert.pretrain.model import word_embedding_weight

    g = ConvBertModel.from_pretrained(out / "generator")
    with torch.no_grad():
        h = g(ids, attention_mask=mask).last_hidden_state
    tensors = load_file(str(out / "generator" / "model.safetensors"))
    import torch.nn.functional as F

    d = F.linear(h, tensors["generator_predictions.dense.weight"], tensors["generator_predictions.dense.bias"])
    d = F.layer_norm(F.gelu(d), (d.shape[-1],), tensors["generator_predictions.LayerNorm.weight"],
                     tensors["generator_predictions.LayerNorm.bias"], eps=1e-12)
    mine = F.linear(d, word_embedding_weight(g.embeddings), tensors["generator_lm_head.bias"])
    assert torch.allclose(mine, logits, atol=1e-4)


def test_config_resolution_and_errors(tiny_data, tmp_path):
    cfg = resolve_config("small", None, {"data": "d", "output": "o"}, None)
    assert (cfg.lr, cfg.batch_size, cfg.steps, cfg.warmup_steps, cfg.generator_fraction) == (3e-4, 128, 10**6, 10**4, 0.25)
    cfg = resolve_config("base", None, {"data": "d", "output": "o"}, None)
    assert (cfg.lr, cfg.batch_size, cfg.generator_fraction) == (2e-4, 256, 1 / 3)
    cfg = resolve_config("medium-small", None, {"data": "d", "output": "o"}, ["lr=1e-3", "model.hidden_dropout_prob=0"])
    assert cfg.lr == 1e-3 and cfg.model == {"hidden_dropout_prob": 0}
    y = tmp_path / "r.yaml"
    y.write_text("size: small\nsteps: 500\nmodel:\n  conv_kernel_size: 7\n")
    cfg = resolve_config(None, str(y), {"data": "d", "output": "o", "steps": 700}, None)
    assert cfg.size == "small" and cfg.steps == 700 and cfg.model == {"conv_kernel_size": 7}
    assert cfg.warmup_steps == 7  # short run: 1 % warmup unless given
    with pytest.raises(ConvBertError, match="bogus_key"):
        resolve_config("tiny", None, {"data": "d", "output": "o"}, ["bogus_key=1"])
    with pytest.raises(ConvBertError, match="model.nope"):
        resolve_config("tiny", None, {"data": "d", "output": "o"}, ["model.nope=1"])
    # model fields get their types: YAML/--set read 1e-12 as text
    cfg = resolve_config("tiny", None, {"data": "d", "output": "o"}, ["model.layer_norm_eps=1e-12"])
    assert cfg.model == {"layer_norm_eps": 1e-12} and type(cfg.model["layer_norm_eps"]) is float
    with pytest.raises(ConvBertError, match=r"--set: key 'model.hidden_dropout_prob' = 'abc': expected float"):
        resolve_config("tiny", None, {"data": "d", "output": "o"}, ["model.hidden_dropout_prob=abc"])
    with pytest.raises(ConvBertError, match="steps"):
        resolve_config("tiny", None, {"data": "d", "output": "o"}, ["steps=abc"])
    y.write_text("size: tiny\nunknown_thing: 3\n")
    with pytest.raises(ConvBertError, match="unknown_thing"):
        resolve_config(None, str(y), {"data": "d", "output": "o"}, None)
    # resuming with another model is refused
    run = tmp_path / "run"
    run_pretraining(cfg_for(tiny_data, run, steps=1, save_every=1), progress=False)
    with pytest.raises(ConvBertError, match="attention"):
        run_pretraining(cfg_for(tiny_data, run, steps=2, attention="plain"), progress=False)


def test_non_finite_loss_skips_then_stops(tiny_data, tmp_path, nan_loss):
    with pytest.raises(ConvBertError, match="3 steps in a row had a non-finite loss"):
        run_pretraining(cfg_for(tiny_data, tmp_path / "run", max_bad_steps=3), progress=False)
    events = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r.get("event") == "non_finite_loss"]
    assert len(events) == 3


def test_cli_pretrain_and_export(tiny_data, tmp_path, capsys):
    from convbert.cli import main

    run = tmp_path / "run"
    rc = main(["pretrain", "--data", str(tiny_data["data"]), "--size", "tiny", "--output", str(run), "--steps", "2",
               "--batch-size", "4", "--eval-batches", "1", "--threads", "1", "--no-progress", "--objective", "mlm"])
    assert rc == 0
    st = json.loads((run / "run_config.json").read_text())
    assert st["pretrain"]["objective"] == "mlm" and st["generator_config"] is None
    rc = main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "exp")])
    assert rc == 0 and (tmp_path / "exp" / "model.safetensors").is_file()
    rc = main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "exp2"), "--generator"])
    assert rc == 2 and "no separate generator" in capsys.readouterr().err
    rc = main(["pretrain", "--data", str(tiny_data["data"]), "--size", "tiny", "--output", str(tmp_path / "x"),
               "--set", "nonsense=1"])
    assert rc == 2 and "nonsense" in capsys.readouterr().err


def test_options_bf16_accumulation_plain_attention_without_replacement(tiny_data, tmp_path):
    out = tmp_path / "run"
    res = run_pretraining(
        cfg_for(tiny_data, out, steps=2, save_every=2, precision="bf16", grad_accum=2, attention="plain",
                masking="without-replacement"),
        progress=False,
    )
    assert res["finished"] and all(math.isfinite(x) for x in losses(out))
    st = json.loads((out / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    # 2 steps x 2 micro-batches x 4 examples
    assert st["loader"][0]["position"] == 16 and st["run_config"]["micro_batch_size"] == 4
    assert st["run_config"]["model_config"]["attention_type"] == "plain"
    from convbert.pretrain.export import export_checkpoint

    # tiny has a grouped FFN: plain attention with it is neither transformers' ConvBERT nor its ELECTRA, and the
    # export says so instead of leaving it to fail there
    info = export_checkpoint(out, tmp_path / "export", generator=True)
    from safetensors import safe_open

    from convbert.weights import CHECKSUM_KEY

    for weights in ("model.safetensors", "discriminator_head.safetensors", "generator/model.safetensors"):
        with safe_open(str(tmp_path / "export" / weights), framework="pt") as f:  # every exported weight file
            assert len((f.metadata() or {}).get(CHECKSUM_KEY, "")) == 64, weights
    assert [n.split(":")[0] for n in info["notes"]] == [
        "the discriminator uses plain self-attention with a grouped FFN (2 groups)",
        "the generator uses plain self-attention with a grouped FFN (2 groups)"]
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "convbert"
    assert json.loads((tmp_path / "export" / "export.json").read_text())["notes"] == info["notes"]
    with pytest.raises(ConvBertError, match="does not split"):
        run_pretraining(cfg_for(tiny_data, tmp_path / "x", batch_size=6, grad_accum=4), progress=False)


def test_schedule_linear_decay_from_step_zero_times_warmup(tiny_data, tmp_path):
    out = tmp_path / "run"
    run_pretraining(cfg_for(tiny_data, out, steps=6, lr=1e-3, warmup_steps=3), progress=False)
    lrs = [r["lr"] for r in read_log(out / "log.jsonl") if r["kind"] == "train"]
    # update k (1-based) uses t = k - 1 finished steps: peak * (1 - t/6) * min(1, t/3); the first update has lr 0
    expected = [1e-3 * (1 - t / 6) * min(1.0, t / 3) for t in range(6)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[0] == 0.0
    # one step gives no rate yet: null, not a string; later records have a number
    rates = [r["tokens_per_s"] for r in read_log(out / "log.jsonl") if r["kind"] == "train"]
    assert rates[0] is None and all(isinstance(r, float) and r > 0 for r in rates[1:])


def test_time_limit_stops_with_checkpoint_and_eval_then_continues(tiny_data, tmp_path):
    out = tmp_path / "run"
    res = run_pretraining(cfg_for(tiny_data, out, steps=50, save_every=50, time_limit=1e-6), progress=False)
    assert res["timed_out"] and not res["finished"] and res["step"] == 1
    assert res["eval"] is not None and ckpt_io.latest_checkpoint(out / "checkpoints").name == "step-00000001"
    res = run_pretraining(cfg_for(tiny_data, out, steps=3, save_every=3), progress=False)
    assert res["resumed"] and res["finished"] and res["step"] == 3


def _eval_steps(run):
    return [(r["step"], bool(r.get("at_stop"))) for r in read_log(Path(run) / "log.jsonl") if r["kind"] == "eval"]


def test_time_limit_stops_leave_the_records_of_an_uninterrupted_run(tiny_data, tmp_path):
    """The evaluation a time-limit stop adds off the schedule is marked and dropped on resume; a stop on the
    schedule is not evaluated twice. The log then holds exactly the uninterrupted run's records."""
    flags = dict(steps=8, save_every=8, eval_every=4)
    full = tmp_path / "full"
    run_pretraining(cfg_for(tiny_data, full, **flags), progress=False)
    cut = tmp_path / "cut"
    res = run_pretraining(cfg_for(tiny_data, cut, **flags, time_limit=1e-6), progress=False)  # stops at step 1
    assert res["timed_out"] and res["step"] == 1 and res["eval"] is not None
    assert _eval_steps(cut) == [(0, False), (1, True)]
    res = run_pretraining(cfg_for(tiny_data, cut, **flags), progress=False)
    assert res["finished"]
    strip = ("time", "eval_seconds", "elapsed_s", "tokens_per_s")  # (timings)

    def records(run):
        return [{k: v for k, v in r.items() if k not in strip} for r in read_log(Path(run) / "log.jsonl")
                if r["kind"] in ("train", "eval")]

    assert records(cut) == records(full)
    assert _eval_steps(cut) == [(0, False), (4, False), (8, False)]


def test_a_finished_run_asked_again_reports_its_last_evaluation_and_a_new_seed_is_refused(tiny_data, tmp_path):
    out = tmp_path / "run"
    first = run_pretraining(cfg_for(tiny_data, out, steps=2, save_every=2), progress=False)
    again = run_pretraining(cfg_for(tiny_data, out, steps=2, save_every=2), progress=False)
    assert again["finished"] and not again["timed_out"] and again["step"] == 2
    assert again["eval"]["disc_auc"] == first["eval"]["disc_auc"]
    with pytest.raises(ConvBertError, match="started with different seed"):
        run_pretraining(cfg_for(tiny_data, out, steps=4, save_every=2, seed=7), progress=False)


def test_checkpoints_and_exports_get_the_usual_file_permissions(tiny_data, tmp_path):
    """Written through private temporaries, but readable by the group/others the umask allows (like every file)."""
    import os
    import stat

    from convbert.cli import main

    mask = os.umask(0o022)
    try:
        assert main(["pretrain", "--data", str(tiny_data["data"]), "--size", "tiny", "--output", str(tmp_path / "r"),
                     "--steps", "1", "--batch-size", "4", "--eval-batches", "1", "--threads", "1",
                     "--no-progress"]) == 0
        assert main(["export", "--checkpoint", str(tmp_path / "r"), "--output", str(tmp_path / "x")]) == 0
    finally:
        os.umask(mask)
    (ck,) = (tmp_path / "r" / "checkpoints").glob("step-*")
    files = [*ck.iterdir(), tmp_path / "x" / "model.safetensors"]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o644 for p in files}
    assert stat.S_IMODE(ck.stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o755  # written aside in a private temporary folder


def test_a_re_export_rewrites_the_folder_whole_and_keeps_what_it_did_not_write(tiny_data, tmp_path):
    from convbert.pretrain.export import export_checkpoint
    from convbert.utils import staged_folder

    run = tmp_path / "run"
    run_pretraining(cfg_for(tiny_data, run, steps=1), progress=False)
    out = tmp_path / "exp"
    export_checkpoint(run, out, generator=True)
    assert (out / "generator" / "model.safetensors").is_file()
    export_checkpoint(run, out)  # without --generator: the earlier generator/ does not linger
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "discriminator_head.safetensors", "export.json",
                                                     "model.safetensors", "tokenizer_config.json", "vocab.txt"]
    # Results saved inside the export would be deleted by rewriting it: refused, folder untouched.
    (out / "glue-results").mkdir()
    (out / "glue-results" / "summary.json").write_text("{}")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConvBertError, match="also holds glue-results"):
        export_checkpoint(run, out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # A write that fails half-way leaves the old folder whole and no temporary folder behind.
    with pytest.raises(RuntimeError):
        with staged_folder(out) as staging:
            (staging / "config.json").write_text("half")
            raise RuntimeError("interrupted")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "run"]


def test_keep_checkpoints_counts_regular_checkpoints_and_keeps_every_milestone(tmp_path):
    from convbert.pretrain import checkpoint as ckpt_io

    milestones = {9, 19, 38, 75, 150}
    for step in sorted(milestones | set(range(10, 151, 10))):
        folder = tmp_path / ckpt_io.checkpoint_name(step)
        folder.mkdir()
        (folder / ckpt_io.STATE_FILE).write_text("{}")
    ckpt_io.prune_checkpoints(tmp_path, 3, milestones)
    kept = [step for step, _ in ckpt_io.list_checkpoints(tmp_path)]
    assert kept == [9, 19, 38, 75, 120, 130, 140, 150]  # 3 regular (120, 130, 140) + the 5 milestones


def test_milestones_of_an_earlier_run_length_survive_a_resume_with_more_steps(tmp_path):
    """A run of 32 steps resumed with --steps 40: its milestones (2, 4, 8, 16, 32) were pruned as regular ones."""
    from convbert.pretrain import checkpoint as ckpt_io

    for step, total in [(2, 32), (4, 32), (8, 32), (16, 32), (32, 32), (33, 40), (34, 40), (35, 40), (36, 40)]:
        folder = tmp_path / ckpt_io.checkpoint_name(step)
        folder.mkdir()
        (folder / ckpt_io.STATE_FILE).write_text(json.dumps({"lr_schedule": {"total_steps": total}}))
    (tmp_path / ".step-00000037.abc.tmp").mkdir()  # a save interrupted by a crash
    ckpt_io.prune_checkpoints(tmp_path, 1, ckpt_io.milestone_steps(40))
    kept = [step for step, _ in ckpt_io.list_checkpoints(tmp_path)]
    assert kept == [2, 4, 8, 16, 32, 36]  # the earlier milestones, and the newest regular one
    assert not list(tmp_path.glob(".step-*.tmp"))
    (tmp_path / ".step-00000038.abc.tmp").mkdir()
    ckpt_io.prune_checkpoints(tmp_path, 0, set())  # --keep-checkpoints 0 keeps everything but still tidies up
    assert not list(tmp_path.glob(".step-*.tmp"))


def test_a_resumed_run_keeps_the_checkpoint_step_in_tensorboard(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    run_pretraining(cfg_for(tiny_data, run, steps=6, stop_at_step=3), progress=False)
    run_pretraining(cfg_for(tiny_data, run, steps=6), progress=False)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tag = next(t for t in events.Tags()["scalars"] if t.startswith("train/"))
    assert [e.step for e in events.Scalars(tag)] == [1, 2, 3, 4, 5, 6]


def test_the_configs_presets_resolve_like_the_size_flag(tiny_data, tmp_path):
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    for size in ("tiny", "small", "medium-small", "base"):
        flags = dict(data=str(tiny_data["data"]), output=str(tmp_path / size), steps=200)
        from_file = resolve_config(None, str(configs / f"{size}.yaml"), flags)
        from_flag = resolve_config(size, None, flags)
        a, b = from_file.to_dict(), from_flag.to_dict()
        a.pop("model")  # the files of the paper sizes spell the model out; the flag takes the preset
        assert b.pop("model") == {}
        assert a == b, size  # warmup (the short-run rule) and save_every included
        assert build_model_config(from_file, 30522, 128) == build_model_config(from_flag, 30522, 128), size


def test_an_mlm_run_exports_as_a_masked_lm_and_continues_with_its_head(tiny_data, tmp_path, capsys):
    """`--objective mlm` (BERT's objective, one encoder): the export is a ConvBertForMaskedLM folder, so its MLM head
    is kept (it was dropped before): the encoder loads as a model here and in transformers, transformers' masked LM
    gives our logits, and `--init-from` continues with every weight, the head included."""
    import torch.nn.functional as F

    from convbert.model.modeling import ConvBertModel
    from convbert.pretrain.export import export_checkpoint
    from convbert.pretrain.model import word_embedding_weight

    source = tmp_path / "source"
    run_pretraining(cfg_for(tiny_data, source, steps=2, objective="mlm", sets=["model.num_attention_heads=8",
                                                                                "model.hidden_dropout_prob=0"]),
                    progress=False)
    out = tmp_path / "exp"
    info = export_checkpoint(source, out)
    assert info["written"] == {"encoder with its MLM head": str(out)} and info["objective"] == "mlm"
    tensors = load_file(str(out / "model.safetensors"))
    assert {"generator_predictions.dense.weight", "generator_lm_head.bias"} <= set(tensors)
    checkpoint, _ = final_weights(source)
    assert torch.equal(tensors["generator_lm_head.bias"], checkpoint["generator_head.output_bias"])
    ours = ConvBertModel.from_pretrained(out).eval()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, checkpoint[f"discriminator.{key}"]), key
    ids = torch.randint(5, 600, (2, 32))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        h = ours(ids, attention_mask=mask).last_hidden_state
        d = F.linear(h, tensors["generator_predictions.dense.weight"], tensors["generator_predictions.dense.bias"])
        d = F.layer_norm(F.gelu(d), (d.shape[-1],), tensors["generator_predictions.LayerNorm.weight"],
                         tensors["generator_predictions.LayerNorm.bias"], eps=1e-12)
        mine = F.linear(d, word_embedding_weight(ours.embeddings), tensors["generator_lm_head.bias"])

    run = tmp_path / "continued"
    capsys.readouterr()
    run_pretraining(cfg_for(tiny_data, run, steps=1, save_every=1, lr=0.0, objective="mlm", init_from=str(out)),
                    progress=False)
    assert "starts from scratch" not in capsys.readouterr().err
    after, _ = final_weights(run)
    assert checkpoint.keys() == after.keys()
    assert all(torch.equal(checkpoint[k], after[k]) for k in checkpoint)  # the MLM head included

    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    hf = transformers.ConvBertForMaskedLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(mine, logits, atol=1e-4)
    encoder = transformers.ConvBertModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert torch.allclose(encoder(input_ids=ids, attention_mask=mask).last_hidden_state, h, atol=1e-4)


def test_init_from_an_export_starts_with_every_weight_and_resumes_without_it(tiny_data, tmp_path, capsys):
    """`--init-from`: a new run starts from an exported model (discriminator, generator, both heads); with lr 0 its
    first checkpoint holds exactly the source run's weights. A resume reads its checkpoints, not the folder."""
    import shutil

    from convbert.pretrain.export import export_checkpoint

    source = tmp_path / "source"  # (dropout 0: a model config the size preset would not rebuild)
    run_pretraining(cfg_for(tiny_data, source, steps=2, sets=["model.hidden_dropout_prob=0"]), progress=False)
    export_checkpoint(source, tmp_path / "exp", generator=True)
    run = tmp_path / "continued"
    run_pretraining(cfg_for(tiny_data, run, steps=1, save_every=1, lr=0.0, init_from=str(tmp_path / "exp")),
                    progress=False)
    err = capsys.readouterr().err
    assert f"init: weights from {tmp_path / 'exp'}" in err and "starts from scratch" not in err
    before, _ = final_weights(source)
    after, _ = final_weights(run)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every tensor, heads included
    recorded = json.loads((run / "run_config.json").read_text())
    assert recorded["pretrain"]["init_from"] == str(tmp_path / "exp")
    # The folder moves away; the run still continues from its own checkpoint.
    shutil.move(tmp_path / "exp", tmp_path / "moved")
    res = run_pretraining(cfg_for(tiny_data, run, steps=2, save_every=1, lr=0.0, init_from=str(tmp_path / "exp")),
                          progress=False)
    assert res["resumed"] and res["step"] == 2
    # Resumed without repeating --init-from: still the recorded model (it was rebuilt from the size preset)
    capsys.readouterr()
    res = run_pretraining(cfg_for(tiny_data, run, steps=3, save_every=1, lr=0.0), progress=False)
    assert res["resumed"] and res["step"] == 3
    assert not [line for line in capsys.readouterr().err.splitlines() if "changed settings" in line and "init_from"
                in line]
    again = json.loads((run / "run_config.json").read_text())
    assert again["model_config"] == recorded["model_config"] and again["model_config"]["hidden_dropout_prob"] == 0

    # A discriminator-only folder (an HF hub download): the generator and the replaced-token head start fresh.
    hub = tmp_path / "hub"
    hub.mkdir()
    for name in ("config.json", "model.safetensors", "vocab.txt"):
        shutil.copy(tmp_path / "moved" / name, hub / name)
    run_pretraining(cfg_for(tiny_data, tmp_path / "from_hub", steps=1, save_every=1, lr=0.0, init_from=str(hub)),
                    progress=False)
    err = capsys.readouterr().err
    assert "init: the generator and its MLM head (the folder has no generator/) starts from scratch" in err
    assert "init: the replaced-token head (the folder has no discriminator_head.safetensors, and its weights no " \
           "discriminator_predictions.*) starts from scratch" in err
    fresh, _ = final_weights(tmp_path / "from_hub")
    assert all(torch.equal(fresh[k], before[k]) for k in before if k.startswith("discriminator."))
    assert not torch.equal(fresh["discriminator_head.dense.weight"], before["discriminator_head.dense.weight"])


def test_init_from_refuses_what_would_not_mean_the_same(tiny_data, tmp_path):
    import shutil

    from convbert.pretrain.export import export_checkpoint

    run_pretraining(cfg_for(tiny_data, tmp_path / "source", steps=1), progress=False)
    export_checkpoint(tmp_path / "source", tmp_path / "exp", generator=True)
    other = tmp_path / "other_vocab"
    shutil.copytree(tmp_path / "exp", other)
    with open(other / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("extra\n")
    cases = [
        (dict(init_from=str(other)), "its vocab.txt differs from the data's"),
        (dict(init_from=str(tmp_path / "exp"), attention="plain"), "the model has mixed attention; pass --attention mixed"),
        (dict(init_from=str(tmp_path / "exp"), sets=["model.num_hidden_layers=3"]),
         "model.num_hidden_layers = 3 differs from the model's 2"),
        (dict(init_from=str(tmp_path / "nowhere")), "not a model folder"),
    ]
    for i, (flags, message) in enumerate(cases):
        with pytest.raises(ConvBertError, match=message):
            run_pretraining(cfg_for(tiny_data, tmp_path / f"run{i}", steps=1, **flags), progress=False)
    # Dropout is not architecture: it may change.
    res = run_pretraining(cfg_for(tiny_data, tmp_path / "dropout", steps=1, init_from=str(tmp_path / "exp"),
                                  sets=["model.hidden_dropout_prob=0.0"]), progress=False)
    assert res["finished"]


def test_export_of_a_moved_checkpoint_never_takes_a_foreign_vocab(tiny_data, tmp_path):
    """Outside its run folder a checkpoint used to pick up any vocab.txt two folders up, unchecked."""
    import shutil

    from convbert.pretrain.export import export_checkpoint

    run = tmp_path / "run"
    run_pretraining(cfg_for(tiny_data, run, steps=2, save_every=2), progress=False)
    moved = tmp_path / "share" / "ck" / "step-00000002"
    shutil.copytree(run / "checkpoints" / "step-00000002", moved)
    real = Path(tiny_data["vocab"]).read_text()
    (tmp_path / "share" / "vocab.txt").write_text(real.replace("[MASK]\n", "[MASK]\nforeign\n", 1))
    export_checkpoint(moved, tmp_path / "exp")
    assert (tmp_path / "exp" / "vocab.txt").read_text() == real  # the recorded data vocab, checked by its hash
    state_file = moved / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["run_config"]["vocab_file"] = str(tmp_path / "gone" / "vocab.txt")
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConvBertError, match=r"cannot find the vocab the run was trained with \(sha256 [0-9a-f]{12}…; looked for "):
        export_checkpoint(moved, tmp_path / "exp2")


def test_a_cased_run_exports_its_casing_and_is_fine_tuned_cased(tmp_path, capsys):
    """A vocabulary and data built with --no-lower-case: the export says so in tokenizer_config.json, so `glue` and
    `finetune` keep capitals and accents (they had lower-cased and stripped them, turning cased words into [UNK])."""
    from convbert.cli import main
    from convbert.finetune.trainer import load_tokenizer

    text = "\n\n".join(f"Hello World Café number {i}. The Quick Brown Fox visits Zürich and Paris." for i in range(300))
    (tmp_path / "corpus.txt").write_text(text + "\n", encoding="utf-8")
    assert main(["train-vocab", "--input", str(tmp_path / "corpus.txt"), "--no-lower-case", "--vocab-size", "200",
                 "--output", str(tmp_path / "vocab.txt")]) == 0
    assert main(["build-data", "--input", str(tmp_path / "corpus.txt"), "--vocab", str(tmp_path / "vocab.txt"),
                 "--no-lower-case", "--max-seq-length", "32", "--output", str(tmp_path / "data"),
                 "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(tmp_path / "data"), "--size", "tiny", "--output", str(run), "--steps",
                 "2", "--batch-size", "4", "--eval-batches", "1", "--threads", "1", "--no-progress"]) == 0
    assert json.loads((run / "run_config.json").read_text())["tokenizer"] == {"lower_case": False,
                                                                              "strip_accents": False}
    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "exp"), "--generator"]) == 0
    for folder in (tmp_path / "exp", tmp_path / "exp" / "generator"):
        positions = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
        assert json.loads((folder / "tokenizer_config.json").read_text()) == {
            "do_lower_case": False, "strip_accents": False, "model_max_length": positions}
    tokens = load_tokenizer(tmp_path / "exp").tokenize("Hello World Café")
    assert tokens == ["Hello", "World", "Café"], tokens

    # A run recorded before the casing was (no "tokenizer" in its run config) takes it from the data's manifest.
    latest = ckpt_io.latest_checkpoint(run / "checkpoints")
    state_file = latest / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["run_config"]["tokenizer"]
    state_file.write_text(json.dumps(state))
    assert main(["export", "--checkpoint", str(latest), "--output", str(tmp_path / "old")]) == 0
    assert load_tokenizer(tmp_path / "old").tokenize("Hello World Café") == ["Hello", "World", "Café"]
    # ... and with the data moved away too, from the vocab (it has capitals), saying so
    (tmp_path / "data").rename(tmp_path / "moved")
    assert main(["export", "--checkpoint", str(latest), "--output", str(tmp_path / "older")]) == 0
    assert "capitals in the vocab, so tokenizer_config.json says do_lower_case false" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "older").tokenize("Hello World Café") == ["Hello", "World", "Café"]


def test_an_uncased_run_exports_lower_casing(tiny_data, tmp_path):
    from convbert.finetune.trainer import load_tokenizer
    from convbert.pretrain.export import export_checkpoint

    out = tmp_path / "run"
    run_pretraining(cfg_for(tiny_data, out, steps=1, save_every=1), progress=False)
    export_checkpoint(out, tmp_path / "exp")
    settings = json.loads((tmp_path / "exp" / "tokenizer_config.json").read_text())
    assert settings["do_lower_case"] is True and settings["strip_accents"] is True
    assert load_tokenizer(tmp_path / "exp").lower_case and load_tokenizer(tmp_path / "exp").strip_accents


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_run_resumes(tiny_data, tmp_path, monkeypatch, capsys):
    from convbert.cli import main

    class SafetensorError(Exception):  # what safetensors raises (its Rust I/O error in the text)
        pass

    real = ckpt_io.save_file
    calls = []

    def fills_the_disk_on_the_second_checkpoint(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 4:  # (three files per checkpoint)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt_io, "save_file", fills_the_disk_on_the_second_checkpoint)
    argv = ["pretrain", "--data", str(tiny_data["data"]), "--size", "tiny", "--output", str(tmp_path / "run"),
            "--steps", "4", "--batch-size", "8", "--save-every", "2", "--eval-batches", "1", "--threads", "1",
            "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("convbert pretrain: error: ")
    assert "cannot write the checkpoint (No space left on device (os error 28)); the earlier checkpoints are " \
        "intact" in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.tmp"))
    monkeypatch.setattr(ckpt_io, "save_file", real)
    assert main(argv) == 0
    assert json.loads((tmp_path / "run" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())[
        "step"] == 4


def test_a_run_killed_after_its_last_checkpoint_finishes_its_end_when_asked_again(tiny_data, tmp_path):
    """Killed between the final checkpoint and the final evaluation: the re-run has no steps left, but writes the
    evaluation and the plot the uninterrupted run has (it used to say "nothing to do" and leave them out)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    for run in (full, cut):
        run_pretraining(cfg_for(tiny_data, run, steps=4, save_every=2, eval_every=2), progress=False)
    log = cut / "log.jsonl"
    records = read_log(log)
    log.write_text("".join(json.dumps(r) + "\n" for r in records if not (r["kind"] == "eval" and r["step"] == 4)))
    (cut / "curves.png").unlink()
    (cut / ".curves.png.k1ll.tmp").write_bytes(b"torn")  # what a kill while plotting leaves
    res = run_pretraining(cfg_for(tiny_data, cut, steps=4, save_every=2, eval_every=2), progress=False)
    assert res["finished"] and res["eval"]["disc_auc"] == _last_eval(full)["disc_auc"]
    assert _eval_steps(cut) == _eval_steps(full) == [(0, False), (2, False), (4, False)]
    assert (cut / "curves.png").is_file() and not (cut / ".curves.png.k1ll.tmp").exists()
    again = run_pretraining(cfg_for(tiny_data, cut, steps=4, save_every=2, eval_every=2), progress=False)
    assert _eval_steps(cut) == _eval_steps(full)  # nothing more to do, nothing appended
    assert again["eval"]["disc_auc"] == res["eval"]["disc_auc"]


def _last_eval(run):
    return [r for r in read_log(Path(run) / "log.jsonl") if r["kind"] == "eval"][-1]


def test_a_run_killed_before_its_first_checkpoint_starts_a_fresh_log(tiny_data, tmp_path):
    """What a kill before the first checkpoint leaves: run_config.json, log records and TensorBoard events, no
    checkpoint. The re-run starts at step 0 and its log must be an uninterrupted run's, not the old records plus."""
    import shutil

    out = tmp_path / "run"
    run_pretraining(cfg_for(tiny_data, out, steps=2, save_every=2), progress=False)
    shutil.rmtree(out / "checkpoints")
    run_pretraining(cfg_for(tiny_data, out, steps=2, save_every=2), progress=False)
    full = tmp_path / "full"
    run_pretraining(cfg_for(tiny_data, full, steps=2, save_every=2), progress=False)
    assert _eval_steps(out) == _eval_steps(full) == [(0, False), (2, False)]
    assert [r["loss"] for r in read_log(out / "log.jsonl") if r["kind"] == "train"] == losses(full)


def test_eval_data_built_with_another_vocab_of_the_same_size_is_refused(tiny_data, tmp_path):
    """Same size, other words at the ids (a shuffled vocab): every held-out metric would be computed on wrong ids."""
    from convbert.data import build_dataset

    words = Path(tiny_data["vocab"]).read_text(encoding="utf-8").splitlines()
    specials, rest = words[:5], words[5:]
    shuffled = tmp_path / "shuffled.txt"
    shuffled.write_text("\n".join(specials + rest[::-1]) + "\n", encoding="utf-8")
    held = tmp_path / "held.txt"
    held.write_text("the json module\n\nthe tarfile module reads archives\n" * 40)
    build_dataset([str(held)], str(shuffled), str(tmp_path / "ev"), max_seq_length=32, progress=False)
    with pytest.raises(ConvBertError, match=r"--eval-data .*ev: built with another vocab than --data .* hashes differ"):
        run_pretraining(cfg_for(tiny_data, tmp_path / "run", steps=1, eval_data=str(tmp_path / "ev")), progress=False)


def test_settings_the_run_would_not_use_are_refused_or_named(tiny_data, tmp_path, capsys):
    """--set model.attention_type was overwritten by --attention without a word, and a --size other than the YAML
    recipe's mixed the two (a 'tiny' run with small's warmup of 10000 steps)."""
    from convbert.cli import main
    from convbert.pretrain.config import resolve_config

    with pytest.raises(ConvBertError, match="model.attention_type = 'plain': the attention is chosen with --attention"):
        run_pretraining(cfg_for(tiny_data, tmp_path / "a", steps=1, sets=["model.attention_type=plain"]),
                        progress=False)
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(ConvBertError, match=r"size 'tiny' was asked for, but .*small.yaml is the recipe for size "
                                            "'small'"):
        resolve_config("tiny", str(root / "configs" / "small.yaml"), {"steps": 10, "data": str(tiny_data["data"]),
                                                                  "output": str(tmp_path / "o")})
    assert resolve_config(None, str(root / "configs" / "small.yaml"),
                          {"steps": 100, "data": str(tiny_data["data"]), "output": str(tmp_path / "o")}).warmup_steps == 1
    for argv, message in (
        (["quickstart", "--minutes", "inf"], "--minutes inf: expected a positive number"),
        (["quickstart", "--minutes", "nan"], "--minutes nan: expected a positive number"),
        (["quickstart", "--seed", "-1", "--output", str(tmp_path / "qs")], "--seed: a seed must be in 0.."),
        (["glue", "--model", "m", "--glue-dir", "g", "--output", str(tmp_path / "g"), "--seeds",
          "99999999999999999999"], "--seeds 99999999999999999999: at most 1000 runs per task"),
    ):
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "qs").exists()


def test_a_time_limit_stop_at_the_last_step_still_gets_its_final_evaluation(tiny_data, tmp_path):
    """Stopped by the time limit at step 1 (an at_stop evaluation there), then asked for 1 step in all: the run is
    finished, and its final evaluation is written as such, not taken from the stop's."""
    out = tmp_path / "run"
    run_pretraining(cfg_for(tiny_data, out, steps=4, save_every=4, time_limit=1e-6), progress=False)
    assert _eval_steps(out) == [(0, False), (1, True)]
    res = run_pretraining(cfg_for(tiny_data, out, steps=1, save_every=1), progress=False)
    assert res["finished"] and _eval_steps(out) == [(0, False), (1, False)]


def test_sigterm_or_ctrl_c_stops_after_the_step_with_a_checkpoint_and_the_resumed_run_is_the_same(
        tiny_data, tmp_path, monkeypatch):
    """SIGTERM (Slurm, torchrun) or SIGINT arriving mid-run: the step finishes, a checkpoint is written there and
    the run stops; re-running continues to exactly the uninterrupted run's records and weights. The handlers are
    restored afterwards."""
    import os
    import signal

    from convbert.pretrain.trainer import Trainer

    flags = dict(steps=8, save_every=8, eval_every=4)
    full = tmp_path / "full"
    run_pretraining(cfg_for(tiny_data, full, **flags), progress=False)
    step = Trainer.train_step
    for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
        cut = tmp_path / name

        def train_step_then_signal(self, _sig=sig):
            out = step(self)
            if self.step == 3:
                os.kill(os.getpid(), _sig)
            return out

        monkeypatch.setattr(Trainer, "train_step", train_step_then_signal)
        before = signal.getsignal(sig)
        res = run_pretraining(cfg_for(tiny_data, cut, **flags), progress=False)
        assert signal.getsignal(sig) is before
        assert res["stopped_by"] == name and res["step"] == 3 and not res["finished"] and not res["timed_out"]
        assert ckpt_io.latest_checkpoint(cut / "checkpoints").name == "step-00000003"
        stops = [r for r in read_log(cut / "log.jsonl") if r["kind"] == "event" and r.get("event") == "stopped"]
        assert stops and stops[-1]["reason"] == name
        monkeypatch.setattr(Trainer, "train_step", step)
        res = run_pretraining(cfg_for(tiny_data, cut, **flags), progress=False)
        assert res["resumed"] and res["finished"] and res["stopped_by"] is None
        assert losses(cut) == losses(full)
        (a, _), (b, _) = final_weights(cut), final_weights(full)
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_sigterm_to_the_pretrain_command_checkpoints_and_exits_with_143(tiny_data, tmp_path):
    """The CLI as a batch scheduler sees it: SIGTERM while training, exit status 128 + 15 after a checkpoint at the
    last logged step; without the handler nothing was saved and the status was -15."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "convbert", "pretrain", "--size", "tiny", "--data", str(tiny_data["data"]),
           "--output", str(out), "--steps", "100000", "--batch-size", "8", "--eval-every", "0", "--eval-batches",
           "1", "--save-every", "0", "--threads", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and '"kind": "train"' in log.read_text()):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM: stopping after this step with a checkpoint" in err
    last = max(r["step"] for r in read_log(log) if r["kind"] == "train")
    assert ckpt_io.latest_checkpoint(out / "checkpoints").name == f"step-{last:08d}"


def test_a_resumed_run_keeps_its_own_settings_for_what_is_not_given_again(tiny_data, tmp_path, capsys):
    """Re-running with fewer flags must not switch the run to the size's defaults: a batch size, learning rate or
    data folder not given again is the run's own; what is given applies and is reported old -> new; another size is
    refused with both values."""
    from convbert.cli import main

    out = tmp_path / "run"
    run_pretraining(cfg_for(tiny_data, out, steps=4, batch_size=4, lr=2e-3, save_every=2), progress=False)
    again = resolve_config(None, None, {"output": str(out), "steps": 6}, [])
    assert (again.size, again.batch_size, again.lr, again.save_every, again.data) == (
        "tiny", 4, 2e-3, 2, str(tiny_data["data"]))
    assert again.threads == 0  # the default, not the run's 1: machine settings are not taken from the run
    capsys.readouterr()
    assert main(["pretrain", "--output", str(out), "--steps", "6", "--resume", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "resuming with changed settings: steps 4 -> 6" in err and "batch_size" not in err
    state = json.loads((out / "run_config.json").read_text())["pretrain"]
    assert (state["batch_size"], state["lr"], state["steps"]) == (4, 2e-3, 6)
    assert main(["pretrain", "--output", str(out), "--size", "small", "--steps", "8"]) == 2
    assert "started with different size (size 'tiny', now 'small')" in capsys.readouterr().err


def test_an_export_of_another_run_is_not_replaced_without_overwrite(tiny_data, tmp_path, capsys):
    """Re-exporting a run (a later step) replaces its own export and says so; the export of another run in the
    same --output is refused unless --overwrite, and left as it was."""
    from convbert.cli import main

    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "exp"
    run_pretraining(cfg_for(tiny_data, a, steps=2, save_every=1), progress=False)
    run_pretraining(cfg_for(tiny_data, b, steps=1), progress=False)
    assert main(["export", "--checkpoint", str(a / "checkpoints" / "step-00000001"), "--output", str(out)]) == 0
    assert main(["export", "--checkpoint", str(a), "--output", str(out)]) == 0
    assert "export: replaced the earlier export of this run (step 1)" in capsys.readouterr().out
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["export", "--checkpoint", str(b), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"holds an earlier export of {a / 'checkpoints' / 'step-00000002'}, another run" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["export", "--checkpoint", str(b), "--output", str(out), "--overwrite"]) == 0
    assert json.loads((out / "export.json").read_text())["checkpoint"].startswith(str(b))


def test_a_run_checkpoint_dataset_or_missing_folder_given_as_a_model_says_what_to_do(tiny_data, tmp_path, capsys):
    """The commonest mix-ups (a run folder where an exported model is wanted, an export where a checkpoint is, a
    folder that does not exist) name what the folder is and the command that fixes it."""
    from convbert.cli import main
    from convbert.pretrain.export import export_checkpoint

    run = tmp_path / "run"
    run_pretraining(cfg_for(tiny_data, run, steps=1), progress=False)
    export_checkpoint(run, tmp_path / "model")
    train = tmp_path / "t.csv"
    train.write_text("q,y\nthe cat,a\nthe dog,b\n")
    step = run / "checkpoints" / "step-00000001"
    cases = [
        (["finetune", "--model", str(run), "--train", str(train), "--text-columns", "q", "--label-column", "y",
          "--output", str(tmp_path / "ft")], f"{run} is a pre-training run folder: export it first, `convbert export "
                                             f"--checkpoint {run} --output DIR`"),
        (["finetune", "--model", str(step), "--train", str(train), "--text-columns", "q", "--label-column", "y",
          "--output", str(tmp_path / "ft")], f"{step} is a pre-training checkpoint: export it first"),
        (["pretrain", "--data", str(tiny_data["data"]), "--output", str(tmp_path / "r2"), "--size", "tiny",
          "--init-from", str(run)], "is a pre-training run folder: export it first"),
        (["glue", "--model", str(tmp_path / "nomodel"), "--glue-dir", str(tmp_path), "--tasks", "rte", "--output",
          str(tmp_path / "g")], "(no such folder)"),
        (["predict", "--model", str(run), "--input", str(train), "--output", str(tmp_path / "p.csv")],
         "is a pre-training run folder: export it first"),
        (["export", "--checkpoint", str(tmp_path / "model"), "--output", str(tmp_path / "x")],
         "is already an exported model folder: give it as --model or --init-from as it is"),
        (["finetune", "--model", str(tiny_data["data"]), "--train", str(train), "--text-columns", "q",
          "--label-column", "y", "--output", str(tmp_path / "ft")], "is a dataset folder written by `convbert "
                                                                    "build-data`, for `convbert pretrain --data`"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err, (argv, err)


def test_a_batch_job_log_gets_status_lines_not_a_progress_bar(tiny_data, tmp_path, capsys, monkeypatch):
    """stderr that is not a terminal (pytest's capture, a Slurm log): no carriage-return frames, but a status line
    with step, loss, tokens/s and ETA (here every step: status_every 0) and one line before each held-out
    evaluation saying how many examples it reads."""
    from convbert.pretrain import logging as run_logging

    original = run_logging.RunLogger.__init__

    def every_step(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "status_every": 0.0})

    monkeypatch.setattr(run_logging.RunLogger, "__init__", every_step)
    run_pretraining(cfg_for(tiny_data, tmp_path / "run", steps=3, eval_batches=2), progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "evaluating 64 held-out examples (2 batches)" in err  # 2 batches of tiny's eval_batch_size 32
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    assert [line.split(",")[0] for line in lines] == ["step 1/3 (33.3 %)", "step 2/3 (66.7 %)", "step 3/3 (100.0 %)"]
    assert "tok/s" in lines[1] and "ETA 0:00:00" in lines[-1] and "loss " in lines[0]
    run_pretraining(cfg_for(tiny_data, tmp_path / "quiet", steps=2), progress=False)
    assert "step 1/2" not in capsys.readouterr().err


def test_init_from_with_another_size_names_the_architecture_and_the_recipe(tiny_data, tmp_path, capsys):
    """--size with --init-from only picks the recipe: the header and export.json say which architecture it is."""
    from convbert.pretrain.export import export_checkpoint

    run_pretraining(cfg_for(tiny_data, tmp_path / "a", steps=1), progress=False)
    export_checkpoint(tmp_path / "a", tmp_path / "m")
    flags = dict(data=str(tiny_data["data"]), output=str(tmp_path / "b"), steps=1, batch_size=8, eval_batches=1,
                 threads=1, init_from=str(tmp_path / "m"))
    capsys.readouterr()
    run_pretraining(resolve_config("small", None, flags, []), progress=False)
    err = capsys.readouterr().err
    assert f"pre-training the tiny model from {tmp_path / 'm'} with the small recipe" in err
    assert "parameters (generator + discriminator, vocab 600)" in err
    info = export_checkpoint(tmp_path / "b", tmp_path / "m2")
    assert (info["size"], info["architecture"]) == ("small", "tiny")


def test_a_signal_during_a_held_out_evaluation_checkpoints_at_once_and_the_evaluation_runs_on_resume(
        tiny_data, tmp_path, monkeypatch):
    """A scheduler's grace period (~30 s) may be shorter than an evaluation: the evaluation stops at the next batch,
    the step is checkpointed, and the resumed run evaluates that step first, so the records and weights equal an
    uninterrupted run's."""
    import os
    import signal

    import convbert.pretrain.trainer as trainer_module

    flags = dict(steps=8, save_every=8, eval_every=4, eval_batches=3, sets=["eval_batch_size=4"])
    full = tmp_path / "full"
    run_pretraining(cfg_for(tiny_data, full, **flags), progress=False)
    cut = tmp_path / "cut"
    original = trainer_module.sequential_batches
    calls = []

    def batches_then_signal(*args, **kwargs):
        calls.append(1)
        for i, batch in enumerate(original(*args, **kwargs)):
            if len(calls) == 2 and i == 1:  # the second evaluation (step 4), after its first batch
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(trainer_module, "sequential_batches", batches_then_signal)
    res = run_pretraining(cfg_for(tiny_data, cut, **flags), progress=False)
    assert res["stopped_by"] == "SIGTERM" and res["step"] == 4 and not res["finished"]
    assert ckpt_io.latest_checkpoint(cut / "checkpoints").name == "step-00000004"
    assert _eval_steps(cut) == [(0, False)]  # the interrupted evaluation is not logged
    monkeypatch.setattr(trainer_module, "sequential_batches", original)
    res = run_pretraining(cfg_for(tiny_data, cut, **flags), progress=False)
    assert res["finished"] and _eval_steps(cut) == [(0, False), (4, False), (8, False)]
    strip = ("time", "eval_seconds", "elapsed_s", "tokens_per_s")

    def records(run):
        return [{k: v for k, v in r.items() if k not in strip} for r in read_log(Path(run) / "log.jsonl")
                if r["kind"] in ("train", "eval")]

    assert records(cut) == records(full)
    (a, _), (b, _) = final_weights(cut), final_weights(full)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_run_started_with_relative_paths_resumes_from_another_folder(tiny_data, tmp_path, monkeypatch):
    """--data given relative to where the run started: resuming from elsewhere (with --output only) finds it through
    the folder recorded in run_config.json."""
    import os
    import shutil

    home = tmp_path / "home"
    home.mkdir()
    shutil.copytree(tiny_data["data"], home / "data")
    monkeypatch.chdir(home)
    first = dict(data="data", output=str(tmp_path / "run"), steps=2, batch_size=8, eval_batches=1, threads=1,
                 save_every=1)
    run_pretraining(resolve_config("tiny", None, first, []), progress=False)
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["cwd"] == os.getcwd()
    monkeypatch.chdir(tmp_path)
    again = resolve_config(None, None, {"output": str(tmp_path / "run"), "steps": 3}, [])
    assert again.data == str(home / "data")
    assert run_pretraining(again, progress=False)["step"] == 3


def test_progress_is_a_bar_on_a_terminal_or_in_jupyter_and_lines_elsewhere(tmp_path, monkeypatch):
    import sys
    import types

    from convbert.pretrain.logging import RunLogger

    assert RunLogger(tmp_path, 10, progress=True).mode == "lines"  # pytest's captured stderr is no terminal
    assert RunLogger(tmp_path, 10, progress="lines").mode == "lines"
    assert RunLogger(tmp_path, 10, progress=False).mode == "quiet"
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert RunLogger(tmp_path, 10, progress=True).mode == "bar"
    assert RunLogger(tmp_path, 10, progress="lines").mode == "lines"


def test_re_export_through_a_linked_checkpoints_folder_and_resume_of_a_moved_project(tiny_data, tmp_path,
                                                                                      monkeypatch):
    """checkpoints/ linked to a scratch disk is still the same run for a re-export; a project folder moved
    elsewhere resumes with --output only, its relative --data taken from where it is now."""
    import os
    import shutil

    from convbert.cli import main

    run = tmp_path / "run"
    run_pretraining(cfg_for(tiny_data, run, steps=2, save_every=1), progress=False)
    shutil.move(str(run / "checkpoints"), str(tmp_path / "scratch"))
    os.symlink(tmp_path / "scratch", run / "checkpoints")
    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "exp")]) == 0
    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "exp")]) == 0  # same run: replaced

    project = tmp_path / "p1"
    project.mkdir()
    shutil.copytree(tiny_data["data"], project / "data")
    monkeypatch.chdir(project)
    flags = dict(data="data", output="r", steps=2, batch_size=8, eval_batches=1, threads=1, save_every=1,
                 stop_at_step=1)
    run_pretraining(resolve_config("tiny", None, flags, []), progress=False)
    moved = tmp_path / "p2"
    shutil.move(str(project), str(moved))
    monkeypatch.chdir(moved)
    again = resolve_config(None, None, {"output": "r"}, [])
    assert again.data == "data"  # the recorded folder is gone: the path as given, from here
    assert run_pretraining(again, progress=False)["step"] == 2


def test_a_small_dataset_still_holds_out_an_example_to_evaluate_on(tiny_data, tmp_path, capsys):
    """2 % of --data is held out, but at least one example: a dataset under 50 examples is evaluated too (it had
    no held-out set, and no evaluation, silently); a one-example dataset cannot spare one, which is said."""
    from convbert.cli import main
    from convbert.data import build_dataset
    from convbert.pretrain.data import holdout_size

    assert [holdout_size(n, 64) for n in (0, 1, 2, 49, 50, 99, 100, 10_000)] == [0, 0, 1, 1, 1, 1, 2, 64]
    assert holdout_size(10_000, 0) == 0
    assert [holdout_size(n, 64, min_train=4) for n in (4, 5, 49)] == [0, 1, 1]  # a batch is left to train on
    assert holdout_size(60, 64, min_train=60) == 0 and holdout_size(120, 64, min_train=119) == 1  # 2 % too
    assert holdout_size(20, 64, min_holdout=0) == 0  # a run begun before the one-example rule
    text = (Path(tiny_data["corpus"]) / "train.txt").read_text(encoding="utf-8")[:6_000]
    (tmp_path / "small.txt").write_text(text, encoding="utf-8")
    m = build_dataset([str(tmp_path / "small.txt")], str(tiny_data["vocab"]), str(tmp_path / "small"),
                      max_seq_length=32, progress=False)
    assert 2 <= m["examples"] < 50
    rc = main(["pretrain", "--data", str(tmp_path / "small"), "--size", "tiny", "--output", str(tmp_path / "run"),
               "--steps", "2", "--batch-size", "4", "--eval-every", "1", "--eval-batches", "1", "--threads", "1",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    evals = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2] and all(0 <= r["disc_auc"] <= 1 for r in evals)
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["eval_holdout_examples"] == 1
    assert "no held-out evaluation" not in capsys.readouterr().err
    (tmp_path / "one.txt").write_text("the cat sat on the mat.\n", encoding="utf-8")
    assert build_dataset([str(tmp_path / "one.txt")], str(tiny_data["vocab"]), str(tmp_path / "one"),
                         max_seq_length=32, progress=False)["examples"] == 1
    assert main(["pretrain", "--data", str(tmp_path / "one"), "--size", "tiny", "--output", str(tmp_path / "run1"),
                 "--steps", "1", "--batch-size", "1", "--threads", "1", "--no-progress"]) == 0
    assert "note: no held-out evaluation: --data has 1 example(s)" in capsys.readouterr().err


def test_fp16_on_the_cpu_trains_with_a_gradient_scaler_and_resumes_bit_exact(tiny_data, tmp_path, capsys):
    """fp16 runs on the CPU as on a GPU (autocast + loss scaling), so its set-up can be checked without one: the
    scaler skips the first overflowing steps and halves its scale, a resumed run restores that scale (else it
    would skip them again) and gives the uninterrupted run's losses and weights, and the CLI says it is slow."""
    from convbert.cli import main

    full, part = tmp_path / "full", tmp_path / "part"
    run_pretraining(cfg_for(tiny_data, full, steps=10, precision="fp16"), progress=False)
    records = [r for r in read_log(full / "log.jsonl") if r["kind"] == "train"]
    skipped = [r["step"] for r in records if not math.isfinite(float(r["grad_norm"]))]  # JSON: "inf"
    assert skipped and skipped == list(range(1, len(skipped) + 1)) and len(skipped) < 10  # overflow, then trains
    assert run_pretraining(cfg_for(tiny_data, part, steps=10, precision="fp16", stop_at_step=4),
                           progress=False)["step"] == 4
    state = json.loads((part / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert 0 < state["grad_scaler"]["scale"] < 65536.0  # halved at each skipped step
    assert run_pretraining(cfg_for(tiny_data, part, steps=10, precision="fp16"), progress=False)["resumed"]
    assert losses(full) == losses(part)
    wa, _ = final_weights(full)
    wb, _ = final_weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert main(["pretrain", "--data", str(tiny_data["data"]), "--size", "tiny", "--output", str(tmp_path / "cli"),
                 "--steps", "1", "--batch-size", "4", "--threads", "1", "--precision", "fp16", "--no-progress"]) == 0
    assert "note: --precision fp16 on the CPU runs through autocast with a gradient scaler" in capsys.readouterr().err


@pytest.mark.parametrize("record", ["zero", "absent"])
def test_a_small_dataset_run_begun_before_the_one_example_holdout_resumes_on_its_own_split(
        tiny_data, tmp_path, monkeypatch, record):
    """Runs recorded before a dataset under 50 examples held one out (0 held out, or no record of it) resume on
    the split they trained on, giving the losses of the same run not stopped, instead of a refusal."""
    import convbert.pretrain.data as pdata
    from convbert.data import build_dataset

    text = (Path(tiny_data["corpus"]) / "train.txt").read_text(encoding="utf-8")[:6_000]
    (tmp_path / "small.txt").write_text(text, encoding="utf-8")
    build_dataset([str(tmp_path / "small.txt")], str(tiny_data["vocab"]), str(tmp_path / "small"),
                  max_seq_length=32, progress=False)
    small = {"data": tmp_path / "small"}
    new_rule = pdata.holdout_size
    monkeypatch.setattr(pdata, "holdout_size", lambda n, e, *a, **k: max(0, min(e, n // 50)))  # the old rule
    run_pretraining(cfg_for(small, tmp_path / "full", steps=4, batch_size=4, save_every=2), progress=False)
    run_pretraining(cfg_for(small, tmp_path / "part", steps=4, batch_size=4, save_every=2, stop_at_step=2),
                    progress=False)
    monkeypatch.setattr(pdata, "holdout_size", new_rule)
    config = tmp_path / "part" / "run_config.json"
    recorded = json.loads(config.read_text())
    assert recorded["eval_holdout_examples"] == 0
    if record == "absent":
        del recorded["eval_holdout_examples"]
        config.write_text(json.dumps(recorded))
    result = run_pretraining(cfg_for(small, tmp_path / "part", steps=4, batch_size=4, save_every=2), progress=False)
    assert result["resumed"] and result["finished"]
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    fresh = run_pretraining(cfg_for(small, tmp_path / "new", steps=1, batch_size=4), progress=False)
    assert fresh["finished"] and json.loads((tmp_path / "new" / "run_config.json").read_text())[
        "eval_holdout_examples"] == 1  # a new run on the same data holds one out


def test_a_run_that_could_not_find_its_vocab_records_the_manifests_and_export_checks_it(tiny_data, tmp_path):
    """The run kept no vocab and recorded no hash, so export took any vocab.txt put into the run folder."""
    import shutil

    from convbert.pretrain.export import export_checkpoint

    data = tmp_path / "data"
    shutil.copytree(tiny_data["data"], data)
    manifest = json.loads((data / "manifest.json").read_text())
    recorded = tmp_path / "moved" / "vocab.txt"  # where the vocab was when the data was built: gone now
    manifest["vocab"]["path"] = str(recorded)
    (data / "manifest.json").write_text(json.dumps(manifest))
    run = tmp_path / "run"
    run_pretraining(cfg_for({**tiny_data, "data": data}, run, steps=1), progress=False)
    assert not (run / "vocab.txt").exists()
    real = Path(tiny_data["vocab"]).read_text()
    (run / "vocab.txt").write_text("\n".join(real.splitlines()[:-50]) + "\n")  # a shorter, foreign vocab
    with pytest.raises(ConvBertError, match=rf"sha256 {manifest['vocab']['sha256'][:12]}…; looked for .*"
                                            rf"{recorded}.*run/vocab.txt has another sha256"):
        export_checkpoint(run, tmp_path / "exp")
    recorded.parent.mkdir()
    recorded.write_text(real)
    export_checkpoint(run, tmp_path / "exp")
    assert (tmp_path / "exp" / "vocab.txt").read_text() == real


def test_the_held_out_set_is_named_at_the_start_and_a_missing_one_on_resume(tiny_data, tmp_path, capsys):
    """An eval/ folder inside --data is used without being asked for: the start line says so, the run records it,
    and a resume after it moved names it (the error blamed "evaluation settings" the user never changed)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data["data"], data)
    run = tmp_path / "run"
    run_pretraining(cfg_for({**tiny_data, "data": data}, run, steps=4, stop_at_step=2), progress="lines")
    out = capsys.readouterr()
    assert f"held-out evaluation on {data / 'eval'} (" in out.out + out.err
    assert json.loads((run / "run_config.json").read_text())["eval_data_dir"] == str(data / "eval")
    shutil.move(data / "eval", tmp_path / "aside")
    with pytest.raises(ConvBertError, match=rf"the run evaluated on {data / 'eval'}, which is not there now"):
        run_pretraining(cfg_for({**tiny_data, "data": data}, run, steps=4), progress=False)
