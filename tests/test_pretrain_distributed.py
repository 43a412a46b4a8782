"""Two-process DDP pre-training on CPU (gloo): both ranks end with identical weights; torchrun launch works."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from convbert.pretrain.quickstart import prepare_data

    root = tmp_path_factory.mktemp("pt_ddp")
    return prepare_data(root, max_chars=80_000, vocab_size=500, max_seq_length=32, progress=False)


def _worker(rank, world, port, data, out, dump, compile_encoders=False):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from convbert.pretrain.config import resolve_config
    from convbert.pretrain.trainer import Trainer

    # compiled: no held-out evaluation, whose no-grad graphs at the evaluation batch size would double what Inductor
    # compiles (~60 s), on rank 0 alone while rank 1 waits; compiled evaluation is checked in test_pretrain_model.py
    cfg = resolve_config("tiny", None, dict(data=data, output=out, steps=3, batch_size=8,
                                            eval_batches=0 if compile_encoders else 1, save_every=3, threads=1,
                                            device="cpu", compile=compile_encoders), None)
    trainer = Trainer(cfg, progress=False)
    try:
        assert trainer.micro_batch == 4
        result = trainer.run()
        torch.save({"state": {k: v.clone() for k, v in trainer.model.state_dict().items()},
                    "result": result, "loader": trainer.loader.state_dict()}, os.path.join(dump, f"rank{rank}.pt"))
    finally:
        trainer.close()


@pytest.mark.parametrize("compile_encoders", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["eager", "compiled"])
def test_two_ranks_gloo_identical_weights(tiny_data, tmp_path, compile_encoders):
    """DDP over the pre-training model, eager and with torch.compile'd encoders (what a multi-GPU run uses)."""
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    mp.spawn(_worker, args=(2, free_port(), str(tiny_data["data"]), str(out), str(dump), compile_encoders), nprocs=2,
             join=True)
    r0 = torch.load(dump / "rank0.pt", weights_only=True)
    r1 = torch.load(dump / "rank1.pt", weights_only=True)
    assert r0["result"]["step"] == r1["result"]["step"] == 3
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # the ranks read different slices of the same global batches
    assert r0["loader"]["position"] == r1["loader"]["position"] == 3 * 8
    st = json.loads((out / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert st["world_size"] == 2 and len(st["rng"]) == 2 and len(st["loader"]) == 2
    # the weights did move
    from safetensors.torch import load_file

    saved = load_file(str(out / "checkpoints" / "step-00000003" / "model.safetensors"))
    assert torch.equal(saved["discriminator.encoder.layer.0.output.dense.weight"],
                       r0["state"]["discriminator.encoder.layer.0.output.dense.weight"])


@pytest.mark.slow
def test_torchrun_cli_two_processes_and_resume(tiny_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "convbert", "pretrain", "--data", str(tiny_data["data"]), "--size", "tiny", "--output", str(out),
           "--batch-size", "8", "--eval-batches", "1", "--threads", "1", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd + ["--steps", "4", "--stop-at-step", "2"], capture_output=True, text=True, env=env,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(cmd + ["--steps", "4"], capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    st = json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert st["world_size"] == 2 and st["step"] == 4
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3, 4]


def test_one_process_resumed_by_two_keeps_one_global_data_position(tiny_data, tmp_path):
    """Every rank resumes from the global position: rank 1 used to restart at the beginning of epoch 0 (it had no
    loader state of its own in a one-process checkpoint) and then re-read data already seen."""
    out = tmp_path / "run"
    flags = ["pretrain", "--data", str(tiny_data["data"]), "--size", "tiny", "--output", str(out), "--batch-size", "8",
             "--eval-batches", "1", "--threads", "1", "--no-progress", "--device", "cpu", "--steps", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "convbert", *flags, "--stop-at-step", "2"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "convbert", *flags], capture_output=True, text=True, env=env,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "checkpoint written by 1 rank(s), now 2" in two.stderr
    st = json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    positions = [(s["epoch"], s["position"]) for s in st["loader"]]
    assert st["world_size"] == 2 and positions == [(0, 32), (0, 32)]  # 4 steps x 8 examples, on both ranks


@pytest.mark.slow
def test_two_nodes_of_one_process_each_train_as_one_run(tiny_data, tmp_path):
    """docs/pretraining.md's multi-node launch, as two "nodes" on this machine: torchrun on each with
    `--nnodes 2` and one rendezvous endpoint. On the second node LOCAL_RANK is 0 while RANK is 1 (a single-node launch
    never separates them); the run is one run, written by global rank 0, and the second node stays silent."""
    out = tmp_path / "run"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-nodes",
                               "-m", "convbert", "pretrain", "--data", str(tiny_data["data"]), "--size", "tiny",
                               "--output", str(out), "--steps", "2", "--batch-size", "8", "--eval-batches", "1",
                               "--threads", "1", "--no-progress", "--device", "cpu"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    logs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-3000:] for _, err in logs]
    st = json.loads((out / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert st["world_size"] == 2 and [s["position"] for s in st["loader"]] == [16, 16]
    finished = [out_ + err for out_, err in logs if "pretrain: finished 2 steps" in out_ + err]
    assert len(finished) == 1  # only global rank 0 reports (which node gets it is the rendezvous' choice)
