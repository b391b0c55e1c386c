"""`lowrank train` under torchrun: 2 CPU ranks over gloo train the tiny model with `distributed:
ddp` (LoRA) and `distributed: fsdp` (QLoRA: the 4-bit base sharded too; and a bottleneck
adapter, saved in lowrank's own format), stop after epoch 1 and --resume to epoch 2; every
checkpoint equals, to the bit, the one-process run on the same batches (See Note: one
process's arithmetic on two ranks, lowrank/workflow/train.py), and PEFT loads the LoRA ones."""

import json
import os
import re

import pytest
import torch

from lowrank import cli, shards
from lowrank.workflow import config as C
from lowrank.workflow import parallel
from lowrank.workflow import train as T

from tests.distributed import spawn

from . import tiny

if not torch.distributed.is_available():
    pytest.skip("this PyTorch is built without torch.distributed", allow_module_level=True)

DEADLINE_S = 180  # a hung rank fails the test instead of blocking CI
WORLD = 2
FILES = ["adapter_config.json", "adapter_model.safetensors", "lowrank_workflow.json", T.STATE_FILE]  # every method
# 5 records; each rank's batches hold 2, so an epoch is 3 batches in 2 steps, and in the second
# step rank 1 has no batch of its own (it recomputes rank 0's with weight 0: parallel.shares)
RECORDS = len(tiny.CONVERSATIONS)
STEPS_PER_EPOCH = 2


def config(model_dir, data, out, **change) -> dict:
    options = {"adapter": {}, "prefix": {"num_virtual_tokens": 4}, "prompt": {"num_virtual_tokens": 4}}.get(
        change.get("method"), {"r": 4, "alpha": 8})
    return {"model": str(model_dir), "data": str(data), "output_dir": str(out), "method_options": options,
            "epochs": 2, "lr": 1e-2,
            # constant: a run stopped after epoch 1 has the 2-epoch run's schedule (cosine would
            # decay over the epochs the first command was given)
            "schedule": "constant", "warmup_ratio": 0.0, "max_length": 128,
            "max_grad_norm": 0.25,  # below these runs' gradient norms: clipping acts (asserted in the test)
            **change}


def torchrun(path, *args) -> str:
    """`torchrun --standalone --nproc_per_node 2 -m lowrank train PATH ARGS`; its output."""
    return spawn.torchrun(["-m", "lowrank", "train", str(path), *args], cwd=path.parent, deadline_s=DEADLINE_S,
                          nproc=WORLD, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})  # See Note: one thread


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return tiny.write_data(tmp_path_factory.mktemp("data") / "five.json")


@pytest.mark.parametrize("mode, method", [("ddp", "lora"), ("fsdp", "qlora"), ("fsdp", "adapter"), ("ddp", "prompt"),
                                          ("fsdp", "prefix")])
def test_two_ranks_train_and_resume_as_one_process_does(mode, method, model_dir, small_data, tmp_path, monkeypatch):
    clip_at = {"prefix": 0.05, "prompt": 0.05}.get(method, 0.25)  # below each method's gradient norms
    ranks_cfg = config(model_dir, small_data, tmp_path / "ranks", method=method, distributed=mode,
                       batch_size=4, grad_accum=1, max_grad_norm=clip_at)  # the global micro-batch: 2 sequences a rank
    (tmp_path / "ranks.yaml").write_text(json.dumps(ranks_cfg))  # JSON is YAML
    first = torchrun(tmp_path / "ranks.yaml", "--set", "epochs=1")
    second = torchrun(tmp_path / "ranks.yaml", "--resume")

    # the one-process run on the same batches: batch_size / 2 and grad_accum * 2, every gradient
    # norm recorded to show that clipping acted (so its equality is tested too)
    norms, clip = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: norms.append(clip(*a, **k)) or norms[-1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        T.train(C.TrainConfig(**{**ranks_cfg, "output_dir": str(tmp_path / "one"), "distributed": "none",
                                 "batch_size": 2, "grad_accum": 2}))
    finally:
        torch.set_num_threads(threads)
    assert len(norms) == 2 * STEPS_PER_EPOCH and max(norms) > ranks_cfg["max_grad_norm"]

    for epoch in (1, 2):
        got, want = tmp_path / "ranks" / f"epoch_{epoch}", tmp_path / "one" / f"epoch_{epoch}"
        files = FILES
        assert sorted(os.listdir(got)) == files
        for name in files[:2]:  # the adapter, byte for byte
            assert (got / name).read_bytes() == (want / name).read_bytes(), (epoch, name)
        a, b = (torch.load(d / T.STATE_FILE, weights_only=True) for d in (got, want))
        assert a["step"] == b["step"] == epoch * STEPS_PER_EPOCH and a["world"] == WORLD and len(a["rank_rng"]) == WORLD
        assert a["trainable"].keys() == b["trainable"].keys()
        assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])
        sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]  # whole tensors, as one process keeps them
        assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
        assert json.loads((got / "lowrank_workflow.json").read_text())["config"]["distributed"] == mode
    assert [n for n in os.listdir(tmp_path / "ranks") if n.startswith(".")] == [shards.LOCK_FILE]  # no temporary directory

    # only rank 0 reports: one data line, one progress line a step, one summary
    for log, steps in ((first, range(1, 3)), (second, range(3, 5))):
        assert log.count("data: 5 records") == 1 and log.count("done:\n") == 1
        assert all(log.count(f"step {s}/{(1 if log is first else 2) * STEPS_PER_EPOCH} ") == 1 for s in steps), log
    assert second.count("resumed from epoch_1 (step 2)") == 1
    assert re.search(rf"^  ranks +{WORLD}$", second, re.M) and re.search(rf"^  records +{RECORDS}$", second, re.M)
    if method in ("lora", "qlora"):  # (prefix, prompt: PEFT loads them in tests/io)
        loads_in_peft(model_dir, got, a["trainable"])


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_compile_under_torchrun(mode, model_dir, small_data, tmp_path):
    """`compile: true` with DDP / FSDP2: each rank compiles its decoder layers before the model is
    wrapped, and the run trains to its checkpoint, which PEFT loads. Not bit for bit against one
    process: a rank compiles for the batch shapes it sees, which one process sees in another
    order (Inductor's code for a static and a dynamic shape may sum differently)."""
    cfg = config(model_dir, small_data, tmp_path / "ranks", method="qlora", distributed=mode, batch_size=4,
                 grad_accum=1, epochs=1, compile=True, activation_checkpointing=True)
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    log = torchrun(tmp_path / "c.yaml")
    assert log.count("compile: 2 decoder layers torch.compiled") == 1 and log.count("done:\n") == 1  # rank 0 reports
    assert re.search(rf"^  ranks +{WORLD}$", log, re.M)
    got = tmp_path / "ranks" / "epoch_1"
    assert sorted(os.listdir(got)) == FILES
    trained = torch.load(got / T.STATE_FILE, weights_only=True)["trainable"]
    assert trained and all(torch.isfinite(t).all() for t in trained.values())
    assert any(k.endswith("lora_B.default.weight") and t.abs().max() > 0 for k, t in trained.items())  # B moved from 0
    loads_in_peft(model_dir, got, trained)


def loads_in_peft(model_dir, checkpoint, trained: dict) -> None:
    """PEFT loads a checkpoint the ranks wrote and holds exactly the trained tensors."""
    peft = pytest.importorskip("peft")
    base, _ = T.load_base(str(model_dir))  # full precision: the adapter tensors are the same for QLoRA
    theirs = peft.PeftModel.from_pretrained(base, checkpoint)
    held = {n.removeprefix("base_model.model."): p for n, p in theirs.named_parameters() if "lora_" in n}
    assert held.keys() == trained.keys() and all(torch.equal(held[n], trained[n]) for n in trained)


# -- what is refused, each before any training (no torchrun needed) -------------------------
def test_distributed_must_be_a_known_mode():
    with pytest.raises(C.ConfigError, match=r"distributed must be one of \('none', 'ddp', 'fsdp'\); got 'deepspeed'"):
        C.TrainConfig(model="m", data="d.json", output_dir="o", distributed="deepspeed")


def test_ddp_outside_torchrun_is_one_error_line(model_dir, small_data, tmp_path, monkeypatch, capsys):
    for k in parallel.TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "c.yaml").write_text(json.dumps(config(model_dir, small_data, tmp_path / "o", distributed="fsdp")))
    assert cli.main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "distributed: fsdp runs under torchrun" in err and "torchrun --nproc_per_node N" in err


def test_none_under_torchrun_is_refused(model_dir, small_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(C.ConfigError, match="distributed is 'none' but this is one of WORLD_SIZE=2 processes"):
        T.train(C.TrainConfig(**config(model_dir, small_data, tmp_path / "o")))


def test_batch_size_must_split_evenly_and_resume_needs_the_same_world(model_dir, small_data, tmp_path, monkeypatch):
    one = C.TrainConfig(**config(model_dir, small_data, tmp_path / "o", batch_size=4, epochs=1))
    T.train(one)  # a checkpoint of one process
    monkeypatch.setattr(parallel, "start", lambda mode, device: parallel.Ranks(mode, 0, WORLD, "cpu"))  # as rank 0 of 2
    with pytest.raises(C.ConfigError, match="must be a multiple of the 2 ranks; got 3"):
        T.train(C.TrainConfig(**config(model_dir, small_data, tmp_path / "p", batch_size=3)))
    with pytest.raises(C.ConfigError, match=r"trained on 1 rank\(s\), this run has 2; .* resume on 1"):
        T.train(C.TrainConfig(**{**one.to_dict(), "epochs": 2}), resume=True)


def test_each_rank_gets_its_share_and_the_same_number_of_passes():
    group = [[0, 1], [2, 3], [4]]  # a step's per-rank batches
    rank0, rank1 = (parallel.shares(group, parallel.Ranks("ddp", r, 2)) for r in range(2))
    assert rank0 == [([0, 1], 1.0), ([4], 1.0)] and rank1 == [([2, 3], 1.0), ([2, 3], 0.0)]
    assert parallel.shares([[0, 1]], parallel.Ranks("fsdp", 1, 2)) == [([0, 1], 0.0)]  # nothing of its own
    assert parallel.shares(group, parallel.Ranks("none")) == [(b, 1.0) for b in group]  # one process: all of it
