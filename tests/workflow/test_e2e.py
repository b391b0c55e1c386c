"""The seed notes' path end to end on a tiny Llama: train from a config file until the model
reproduces its conversations, chat with it in a terminal, resume a run bit for bit, and
check that every method's checkpoint loads back into the very model that was trained."""

import dataclasses
import io
import json
import math
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from lowrank import cli, shards
from lowrank.workflow import config as C
from lowrank.workflow.data import Turn
from lowrank.workflow.generate import stream
from lowrank.workflow.methods import load_trainable
from lowrank.workflow.model import apply_method, load_base, load_with_adapter
from lowrank.workflow.train import STATE_FILE, train

from . import tiny
from .conftest import REPEAT, ROOT

EPOCHS = 20  # conftest.TRAIN_YAML


def test_training_writes_a_checkpoint_each_epoch_and_a_summary(trained):
    out, proc = trained
    for e in range(1, EPOCHS + 1):
        names = sorted(os.listdir(out / f"epoch_{e}"))
        assert names == ["adapter_config.json", "adapter_model.safetensors", "lowrank_workflow.json", STATE_FILE]
    assert [n for n in os.listdir(out) if n.startswith(".")] == [shards.LOCK_FILE]  # no temporary directory left
    assert "0 truncated" in proc.stderr and "tok/s" in proc.stderr and " lr " in proc.stderr
    summary = dict(line.split(None, 1) for line in proc.stdout.split("done:\n")[1].splitlines())
    assert int(summary["epochs"]) == EPOCHS and int(summary["steps"]) == EPOCHS * math.ceil(REPEAT * len(tiny.CONVERSATIONS) / 4)  # batch_size 4
    assert float(summary["loss"]) < 0.1
    assert summary["checkpoint"] == str(out / f"epoch_{EPOCHS}")


def test_trained_model_reproduces_every_answer(trained, model_dir):
    out, _ = trained
    model, tok, template = load_with_adapter(str(model_dir), str(out / f"epoch_{EPOCHS}"))
    for record in tiny.CONVERSATIONS:
        turns = record["conversation"]
        history = []
        for turn in turns:
            answer = "".join(stream(model, tok, template, history, turn["input"], turns[0].get("system")))
            assert answer == turn["output"]
            history.append(Turn(turn["input"], turn["output"]))


def test_checkpoint_is_a_peft_adapter(trained, model_dir):
    """PEFT loads the checkpoint and computes the same logits as lowrank."""
    peft = pytest.importorskip("peft")
    out, _ = trained
    ckpt = out / f"epoch_{EPOCHS}"
    ours, tok, _ = load_with_adapter(str(model_dir), str(ckpt))
    base, _ = load_base(str(model_dir))
    theirs = peft.PeftModel.from_pretrained(base, ckpt).eval()
    x = torch.tensor([tok("Where are we? Orbit of Titan")["input_ids"]])
    with torch.no_grad():
        # PEFT and lowrank run the same float32 operations in the same order (docs/io.md)
        torch.testing.assert_close(ours(input_ids=x).logits, theirs(input_ids=x).logits, rtol=0, atol=0)


def test_chat_in_a_terminal(trained, model_dir):
    pexpect = pytest.importorskip("pexpect", reason="pexpect drives the terminal session (pip install pexpect)")
    out, _ = trained
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    child = pexpect.spawn(sys.executable, ["-m", "lowrank", "chat", str(model_dir), "--adapter",
                                           str(out / f"epoch_{EPOCHS}"), "--system", tiny.SYSTEM],
                          env=env, encoding="utf-8", timeout=120)
    try:
        child.expect_exact(">>> ")
        child.sendline("Where are we?")
        child.expect_exact("Orbit of Titan, deck seven.\r\n>>> ")
        child.sendline("How long until dawn?")  # the second turn of record 0: answered with the history
        child.expect_exact("Forty minutes.\r\n>>> ")
        child.sendline("/system")
        child.expect_exact("(system prompt removed; history cleared)")
        child.sendline("Play some music.")  # record 3 has no system prompt
        child.expect_exact("Playing the blue nebula suite.\r\n>>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_merge_then_chat(trained, model_dir, tmp_path):
    """The seed notes' `xtuner convert merge`: `lowrank merge` folds the last checkpoint into the
    model; plain transformers loads the merged directory, and a chat with it (no adapter)
    gives the trained answers."""
    pexpect = pytest.importorskip("pexpect", reason="pexpect drives the terminal session (pip install pexpect)")
    transformers = pytest.importorskip("transformers")
    out, _ = trained
    merged = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = __import__("subprocess").run([sys.executable, "-m", "lowrank", "merge", str(model_dir),
                                         str(out / f"epoch_{EPOCHS}"), str(merged), "--max-shard-size", "200KB"],
                                        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (merged / "model.safetensors.index.json").is_file()  # sharded, as --max-shard-size asked
    assert (merged / "tokenizer.json").is_file()  # the base directory's tokenizer files come along
    assert (merged / "lowrank_workflow.json").is_file()  # and the adapter's workflow file: chat finds its template
    plain = transformers.AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    adapted, tok, _ = load_with_adapter(str(model_dir), str(out / f"epoch_{EPOCHS}"))
    x = torch.tensor([tok("Where are we? Orbit of Titan")["input_ids"]])
    with torch.no_grad():
        # merged weight W + s B A is rounded once to float32: logits agree to float32 rounding, and
        # the greedy answers below (the real test) must be the same tokens
        torch.testing.assert_close(plain(input_ids=x).logits, adapted(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    child = pexpect.spawn(sys.executable, ["-m", "lowrank", "chat", str(merged), "--system", tiny.SYSTEM],
                          env=env, encoding="utf-8", timeout=120)
    try:
        child.expect_exact(">>> ")
        child.sendline("Where are we?")
        child.expect_exact("Orbit of Titan, deck seven.\r\n>>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def _config(tmp_path, model_dir, data_file, **change):
    values = dict(model=str(model_dir), data=str(data_file), output_dir=str(tmp_path / "a"), epochs=2, lr=1e-2,
                  batch_size=4, grad_accum=2, max_length=128, method_options={"r": 4, "dropout": 0.1})
    return C.TrainConfig(**{**values, **change})


def _train_and_resume(tmp_path, whole):
    """Train `whole` (its output_dir tmp_path / "a"); then --resume from a copy of its epoch_1 in
    tmp_path / "b" (config tmp_path / "b.yaml"). Returns the two output folders."""
    train(whole)
    resumed = tmp_path / "b"
    resumed.mkdir()
    shutil.copytree(tmp_path / "a" / "epoch_1", resumed / "epoch_1")
    (tmp_path / "b.yaml").write_text(json.dumps({**whole.to_dict(), "output_dir": str(resumed)}))
    assert cli.main(["train", str(tmp_path / "b.yaml"), "--resume"]) == 0
    return tmp_path / "a", resumed


def test_resume_equals_an_uninterrupted_run(tmp_path, model_dir, data_file, capsys):
    """Train 2 epochs; then give a fresh output_dir only epoch_1 and --resume: epoch_2 is the
    same to the bit (dropout on, so the RNG state must come back too)."""
    whole = _config(tmp_path, model_dir, data_file)
    _, resumed = _train_and_resume(tmp_path, whole)
    per_epoch = math.ceil(math.ceil(REPEAT * len(tiny.CONVERSATIONS) / whole.batch_size) / whole.grad_accum)
    assert f"resumed from epoch_1 (step {per_epoch})" in capsys.readouterr().err
    a, b = (load_file(d / "epoch_2" / "adapter_model.safetensors") for d in (tmp_path / "a", resumed))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = (torch.load(d / "epoch_2" / STATE_FILE, weights_only=True) for d in (tmp_path / "a", resumed))
    assert sa["step"] == sb["step"] == 2 * per_epoch and torch.equal(sa["rng"], sb["rng"])
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)

    # what --resume refuses, each before any training
    (tmp_path / "c.yaml").write_text(json.dumps({**whole.to_dict(), "output_dir": str(resumed), "lr": 0.5}))
    for argv, message in [(["train", str(tmp_path / "b.yaml")], "already holds checkpoints (epoch_2); pass --resume"),
                          (["train", str(tmp_path / "b.yaml"), "--resume"], "is already epoch 2 of epochs=2"),
                          (["train", str(tmp_path / "c.yaml"), "--resume"], "differs from the one")]:
        assert cli.main(argv) == 2
        assert message in capsys.readouterr().err


def test_resume_with_more_epochs_follows_the_new_schedule_from_its_first_step(tmp_path, model_dir, data_file,
                                                                              monkeypatch):
    """epochs may change on --resume: every step after it takes the lr of the new run's schedule
    (the first one took the checkpoint's, the old schedule's, before)."""
    from lowrank.workflow import train as train_mod

    used, step = [], train_mod.PagedAdamW.step

    def spy(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(train_mod.PagedAdamW, "step", spy)
    one = _config(tmp_path, model_dir, data_file, epochs=1, grad_accum=1, warmup_ratio=0.0, method_options={"r": 4})
    train(one, stream=io.StringIO())
    before = len(used)
    train(dataclasses.replace(one, epochs=2), resume=True, stream=io.StringIO())
    factor = train_mod.schedule(dataclasses.replace(one, epochs=2), 2 * before)
    assert used[before:] == [one.lr * factor(s) for s in range(before, 2 * before)]


def test_a_killed_save_leaves_nothing_a_resume_keeps(tmp_path, model_dir, data_file):
    config = _config(tmp_path, model_dir, data_file, epochs=2, grad_accum=1, method_options={"r": 4})
    train(dataclasses.replace(config, epochs=1), stream=io.StringIO())
    stale = tmp_path / "a" / ".epoch_2.x1y2z3w4.tmp"  # what _save was writing when the run was killed
    kept = tmp_path / "a" / ".epoch_2.backup.tmp"  # the user's: not a name _save makes
    kept.mkdir()
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    out = io.StringIO()
    train(config, resume=True, stream=out)
    assert not stale.exists() and "unfinished checkpoints a stopped run left: ['.epoch_2.x1y2z3w4.tmp']" in out.getvalue()
    assert kept.is_dir()
    assert (tmp_path / "a" / "epoch_2" / STATE_FILE).is_file()


def test_output_dir_problems_are_refused_before_training(tmp_path, model_dir, data_file, capsys):
    config = _config(tmp_path, model_dir, data_file, epochs=1, output_dir=str(tmp_path / "out"))
    (tmp_path / "out" / "epoch_1").mkdir(parents=True)  # an adapter whose trainer_state.pt went: not overwritten
    (tmp_path / "out" / "epoch_1" / "adapter_model.safetensors").write_bytes(b"keep me")
    (tmp_path / "file").write_text("")
    for out, message in [(tmp_path / "out", "already holds checkpoints (epoch_1)"),
                         (tmp_path / "file", "is not a directory"), (tmp_path / "file" / "sub", "is not a directory")]:
        (tmp_path / "c.yaml").write_text(json.dumps({**config.to_dict(), "output_dir": str(out)}))
        assert cli.main(["train", str(tmp_path / "c.yaml")]) == 2
        err = capsys.readouterr().err
        assert message in err and "step 1/" not in err  # before the first step
    assert (tmp_path / "out" / "epoch_1" / "adapter_model.safetensors").read_bytes() == b"keep me"


@pytest.mark.parametrize("method, options, template, nf4", [
    ("dora", {"r": 4}, None, {}), ("qlora", {"r": 4}, None, {}), ("adapter", {}, "chatml", {}),
    # a float32 model whose 4-bit layers compute in bfloat16: bfloat16 adapters read float32
    # activations (lowrank/tuners/lora_base.py, Note: x in the adapter's dtype; it raised before)
    ("qlora", {"r": 4, "dropout": 0.1}, None, {"compute_dtype": "bfloat16"}),
    ("prefix", {"num_virtual_tokens": 4}, None, {}),
    ("prefix", {"num_virtual_tokens": 4, "projection_hidden": 8}, None, {}),  # saved folded: the same outputs
    ("prompt", {"num_virtual_tokens": 4}, None, {}),
], ids=["dora", "qlora", "adapter", "qlora-bf16-compute", "prefix", "prefix-mlp", "prompt"])
def test_every_method_trains_and_its_checkpoint_loads_back(tmp_path, model_dir, data_file, method, options, template,
                                                           nf4):
    config = _config(tmp_path, model_dir, data_file, method=method, method_options=options, epochs=1, lr=5e-2,
                     template=template, nf4=nf4)
    summary = train(config)
    assert math.isfinite(summary.loss)
    # the model as training left it: a fresh base, the method, the trainable tensors of the checkpoint
    trained_model, tok = load_base(str(model_dir))
    apply_method(trained_model, method, options, nf4)
    load_trainable(trained_model, torch.load(f"{summary.checkpoint}/{STATE_FILE}", weights_only=True)["trainable"])
    loaded, _, used = load_with_adapter(str(model_dir), summary.checkpoint)
    assert used == template  # chat uses the template training used
    base, _ = load_base(str(model_dir))
    x = torch.tensor([tok("Status of the reactor? Stable")["input_ids"]])
    with torch.no_grad():
        want = trained_model.eval()(input_ids=x).logits
        torch.testing.assert_close(loaded(input_ids=x).logits, want, rtol=0, atol=0)  # same tensors, same ops
        # and training changed something (a prompt adds n virtual positions before the text's)
        assert not torch.allclose(base(input_ids=x).logits, want[:, -x.shape[1]:])


def test_float32_adapters_on_a_bf16_base_train_and_load_back_unrounded(tmp_path, model_dir, data_file):
    """adapter_dtype: float32 on a bfloat16 4-bit base (PEFT's default dtype): the checkpoint holds
    float32 tensors, and chat's loader (which reads adapter_dtype from the run's config) gets
    them unrounded: the model as training left it, logit for logit."""
    config = _config(tmp_path, model_dir, data_file, method="qlora", epochs=1, dtype="bfloat16",
                     adapter_dtype="float32", nf4={"compute_dtype": "bfloat16"})
    summary = train(config)
    assert math.isfinite(summary.loss)
    saved = load_file(f"{summary.checkpoint}/adapter_model.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}
    trained_model, tok = load_base(str(model_dir), "bfloat16")
    apply_method(trained_model, "qlora", dict(config.method_options), dict(config.nf4), "float32")
    load_trainable(trained_model, torch.load(f"{summary.checkpoint}/{STATE_FILE}", weights_only=True)["trainable"])
    loaded, _, _ = load_with_adapter(str(model_dir), summary.checkpoint, dtype="bfloat16")
    params = {n: p for n, p in loaded.named_parameters() if p.requires_grad or "lora_" in n}
    assert params and {p.dtype for p in params.values()} == {torch.float32}
    x = torch.tensor([tok("Status of the reactor? Stable")["input_ids"]])
    with torch.no_grad():
        want = trained_model.eval()(input_ids=x).logits
        assert want.dtype == torch.bfloat16
        torch.testing.assert_close(loaded(input_ids=x).logits, want, rtol=0, atol=0)  # same tensors, same ops


@pytest.mark.parametrize("option", ["activation_checkpointing", "paged_optimizer"])
def test_memory_options_change_memory_not_results(tmp_path, model_dir, data_file, option):
    """activation_checkpointing recomputes activations in backward: the same float32 operations
    again. paged_optimizer trains with lowrank.optim.PagedAdamW: AdamW's update code on the same
    tensors (on a GPU the moments live in managed memory). Either way the adapter is the same to the bit."""
    plain = train(_config(tmp_path, model_dir, data_file, epochs=1, method_options={"r": 4}))
    again = train(_config(tmp_path, model_dir, data_file, epochs=1, method_options={"r": 4},
                          output_dir=str(tmp_path / option), **{option: True}))
    a, b = (load_file(f"{s.checkpoint}/adapter_model.safetensors") for s in (plain, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_8bit_optimizer_states_resume_to_the_bit(tmp_path, model_dir, data_file, capsys, monkeypatch):
    """`optimizer_bits: 8` trains with PagedAdamW(state_bits=8). The tiny model's adapters are all
    below AdamW8bit's 4096-element threshold, so here every tensor is put in 8 bits
    (min_8bit_size=0): the checkpoint holds uint8 codes and int32 scales, and --resume from
    epoch_1 gives epoch_2 to the bit, as with float32 states."""
    from lowrank.workflow import train as train_mod

    real, made = train_mod.PagedAdamW, []

    def paged(*args, **kw):
        made.append(kw)
        return real(*args, min_8bit_size=0, **kw)

    monkeypatch.setattr(train_mod, "PagedAdamW", paged)
    runs = _train_and_resume(tmp_path, _config(tmp_path, model_dir, data_file, optimizer_bits=8))
    assert [kw["state_bits"] for kw in made] == [8, 8]
    a, b = (load_file(d / "epoch_2" / "adapter_model.safetensors") for d in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(d / "epoch_2" / STATE_FILE, weights_only=True) for d in runs)
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert pa["state1"].dtype == torch.uint8 and pa["absmax1"].dtype == torch.int32
        assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_compile_trains_with_each_decoder_layer_compiled(tmp_path, model_dir, data_file, monkeypatch):
    """`compile: true` hands the quantized, injected model to compile_blocks before the first
    step, and training runs through the compiled layers (batches of several lengths: one
    recompilation with dynamic shapes). How close compiled numbers stay to eager's:
    tests/quant/test_quantize.py::test_compiled_blocks_under_checkpointing_are_as_accurate_as_eager."""
    from lowrank.quant import Linear4bit
    from lowrank.workflow import model as model_mod
    from lowrank.workflow import train as train_mod

    compiled = []

    def spy(model, **options):
        assert any(isinstance(m, Linear4bit) for m in model.modules())  # quantize and inject came first
        compiled.append(model_mod.compile_blocks(model, **options))
        return compiled[-1]

    monkeypatch.setattr(train_mod, "compile_blocks", spy)
    torch._dynamo.reset()
    log = io.StringIO()
    summary = train(_config(tmp_path, model_dir, data_file, epochs=1, method="qlora", method_options={"r": 4},
                            activation_checkpointing=True, compile=True), stream=log)
    assert compiled == [2]  # the tiny model's two decoder layers
    assert log.getvalue().count("compile: 2 decoder layers torch.compiled") == 1
    assert math.isfinite(summary.loss) and summary.steps > 1
    adapter = load_file(f"{summary.checkpoint}/adapter_model.safetensors")
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
    assert any(k.endswith("lora_B.weight") and t.abs().max() > 0 for k, t in adapter.items())  # B moved from 0


def test_chat_with_a_missing_adapter_is_one_error_line(model_dir, tmp_path, capsys):
    assert cli.main(["chat", str(model_dir), "--adapter", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.endswith(f"lowrank chat: error: --adapter {str(tmp_path / 'nope')!r} is not a directory\n")


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_chat_streaming_with_the_cache_equals_greedy_without_it(tmp_path, model_dir, data_file, method):
    """Prefix and prompt tuning change what the cache holds (prefix: never; prompt: its n
    virtual tokens): the chat's cached, token-by-token generation must pick the same tokens as
    recomputing the whole sequence each step."""
    from lowrank.workflow.generate import Settings
    from lowrank.workflow.template import encode

    config = _config(tmp_path, model_dir, data_file, method=method, method_options={"num_virtual_tokens": 4},
                     epochs=1, lr=5e-2)
    model, tok, template = load_with_adapter(str(model_dir), train(config).checkpoint)
    turns = [Turn(input="Where are we?", output=None, system=tiny.SYSTEM)]
    streamed = "".join(stream(model, tok, template, [], "Where are we?", tiny.SYSTEM, Settings(max_new_tokens=12)))
    ids, _ = encode(tok, template, turns)
    out = []
    with torch.no_grad():
        for _ in range(12):
            token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == tok.eos_token_id:
                break
            out.append(token)
    assert len(out) > 2 and streamed == tok.decode(out, skip_special_tokens=True)


def test_a_long_chat_drops_its_oldest_exchanges(trained, model_dir):
    from lowrank.workflow.generate import Settings
    from lowrank.workflow.template import encode

    out, _ = trained
    model, tok, template = load_with_adapter(str(model_dir), str(out / f"epoch_{EPOCHS}"))
    limit, settings = model.config.max_position_embeddings, Settings(max_new_tokens=20)
    history = [Turn("Where are we?", "Orbit of Titan, deck seven.")] * 200  # thousands of tokens: far past the context
    answer = "".join(stream(model, tok, template, history, "How long until dawn?", tiny.SYSTEM, settings))

    def length(k):  # prompt tokens with the newest k exchanges kept
        turns = (history[-k:] if k else []) + [Turn("How long until dawn?", None)]
        return len(encode(tok, template, [dataclasses.replace(turns[0], system=tiny.SYSTEM)] + turns[1:])[0])

    kept = max(k for k in range(len(history) + 1) if length(k) + 20 <= limit)  # the rule: room for 20 new tokens
    assert 0 < kept < len(history)
    assert answer == "".join(stream(model, tok, template, history[-kept:], "How long until dawn?", tiny.SYSTEM, settings))
    with pytest.raises(ValueError, match=f"the model's context holds {limit}"):
        list(stream(model, tok, template, [], "word " * limit, tiny.SYSTEM))
