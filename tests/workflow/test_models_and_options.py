"""Bases the workflow must take as transformers does (a directory with its own model code), and
options that must not train wrong or fail late: float16 bases, a CUDA device on a CPU machine,
an adapter whose base was moved. Each is a problem a review found."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lowrank.workflow import config as C
from lowrank.workflow.model import load_with_adapter, pick_device
from lowrank.workflow.train import train

from .conftest import lowrank


def _config(tmp_path, model_dir, data_file, **change):
    values = dict(model=str(model_dir), data=str(data_file), output_dir=str(tmp_path / "a"), epochs=1, lr=1e-2,
                  batch_size=4, grad_accum=1, max_length=128, method_options={"r": 4})
    return C.TrainConfig(**{**values, **change})


def test_a_float16_base_trains_float32_adapters(tmp_path, model_dir, data_file):
    """AdamW's eps is 0 in float16, so float16 adapters trained NaN from the second step."""
    config = _config(tmp_path, model_dir, data_file, dtype="float16", epochs=2)
    assert config.adapter_dtype == "float32"
    summary = train(config)
    assert math.isfinite(summary.loss)
    saved = load_file(f"{summary.checkpoint}/adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in saved.values())
    with pytest.raises(C.ConfigError, match=r"adapter_dtype: float16 trains NaN \(AdamW's eps"):
        _config(tmp_path, model_dir, data_file, dtype="float16", adapter_dtype="float16")


def remote_copy(model_dir, where):
    """The tiny model as a directory with its own model code, as internlm/internlm-chat-7b ships:
    model_type "internlm", classes in the directory, named by its config's auto_map."""
    shutil.copytree(model_dir, where)
    (where / "configuration_internlm.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass InternLMConfig(LlamaConfig):\n    model_type = 'internlm'\n")
    (where / "modeling_internlm.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_internlm import InternLMConfig\n\n\n"
        "class InternLMForCausalLM(LlamaForCausalLM):\n    config_class = InternLMConfig\n")
    config = json.loads((where / "config.json").read_text())
    config.update(model_type="internlm", architectures=["InternLMForCausalLM"],
                  auto_map={"AutoConfig": "configuration_internlm.InternLMConfig",
                            "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM"})
    (where / "config.json").write_text(json.dumps(config))
    return where


def test_a_model_with_its_own_code_trains_chats_and_merges_with_trust_remote_code(tmp_path, model_dir, data_file):
    remote = remote_copy(model_dir, tmp_path / "remote")
    with pytest.raises(C.ConfigError, match="trust_remote_code"):
        train(_config(tmp_path, remote, data_file))
    summary = train(_config(tmp_path, remote, data_file, output_dir=str(tmp_path / "b"), trust_remote_code=True))
    model, _, _ = load_with_adapter(str(remote), summary.checkpoint, trust_remote_code=True)
    assert type(model).__name__ == "InternLMForCausalLM"
    lowrank("merge", remote, summary.checkpoint, tmp_path / "merged", "--trust-remote-code")
    merged = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged["architectures"] == ["InternLMForCausalLM"]
    done = lowrank("chat", remote, "--adapter", summary.checkpoint, "--trust-remote-code", "--max-new-tokens", "2",
                   check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_chat_takes_an_adapter_of_a_moved_base_when_told(tmp_path, model_dir, data_file):
    summary = train(_config(tmp_path, model_dir, data_file))
    moved = shutil.copytree(model_dir, tmp_path / "renamed-model")
    with pytest.raises(ValueError, match="allow_other_base=True"):
        load_with_adapter(str(moved), summary.checkpoint)
    load_with_adapter(str(moved), summary.checkpoint, allow_other_base=True)
    done = lowrank("chat", moved, "--adapter", summary.checkpoint, "--allow-other-base", "--max-new-tokens", "2",
                   check=False)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is there")
def test_a_cuda_device_without_a_gpu_is_a_config_error():
    with pytest.raises(C.ConfigError, match=r"device 'cuda': this PyTorch sees no CUDA GPU"):
        pick_device("cuda")


def test_a_meta_device_or_a_gpu_past_the_last_is_a_config_error(monkeypatch):
    # both were accepted: meta failed at the first step, cuda:3 on a one-GPU machine in torch's own words
    with pytest.raises(C.ConfigError, match=r"device 'meta' holds no values \(shapes only\)"):
        pick_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(C.ConfigError, match=r"device 'cuda:3': this machine has 1 CUDA GPU \(cuda:0 to cuda:0\)"):
        pick_device("cuda:3")
    assert pick_device("cuda:0") == torch.device("cuda", 0) and pick_device("cuda") == torch.device("cuda")


def gpt2_dir(where):
    """A tiny GPT-2: absolute position embeddings, a table of 64."""
    import transformers

    from . import tiny

    tokenizer = tiny.build_tokenizer()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    transformers.GPT2LMHeadModel(config).save_pretrained(where)
    tokenizer.save_pretrained(where)
    return where


def test_examples_longer_than_the_position_table_are_refused_before_training(tmp_path, data_file):
    """They failed with an IndexError at the first batch holding one."""
    model = gpt2_dir(tmp_path / "gpt2")
    with pytest.raises(C.ConfigError, match=r"position embeddings hold 64; set max_length to at most 44"):
        train(_config(tmp_path, model, data_file, method="prompt", method_options={"num_virtual_tokens": 20}))
    assert not (tmp_path / "a" / "epoch_1").exists()


def test_chat_leaves_room_for_the_virtual_tokens_in_the_context(tmp_path):
    """A prompt's virtual tokens take positions: chat's budget counts them, so the answer stops at
    the context's end instead of failing there."""
    import lowrank
    from lowrank.workflow.generate import Settings, stream
    from lowrank.workflow.model import load_base

    model, tok = load_base(str(gpt2_dir(tmp_path / "gpt2")))
    lowrank.inject(model, lowrank.PromptConfig(num_virtual_tokens=20))
    settings = Settings(max_new_tokens=64)
    answer = "".join(stream(model, tok, "plain", [], "Where are we? " * 3, None, settings))  # ~30 prompt tokens
    assert answer  # it ran to the end of the 64 positions without an error
    with pytest.raises(ValueError, match="the model's context holds 44"):
        list(stream(model, tok, "plain", [], "word " * 60, None, settings))


def test_a_loss_gone_nan_stops_the_run_before_its_update(tmp_path, model_dir, data_file):
    """It went on, writing NaN checkpoints every epoch."""
    with pytest.raises(FloatingPointError, match=r"step 2 \(epoch 1\): the loss is nan; stopped before its update"):
        train(_config(tmp_path, model_dir, data_file, lr=1e30, warmup_ratio=0.0, max_grad_norm=0.0, epochs=2))
    assert not (tmp_path / "a" / "epoch_1").exists()


def test_a_checkpoint_written_before_a_config_field_existed_resumes(tmp_path):
    """Its config lacks trust_remote_code, which is then at its default: not a difference."""
    from lowrank.workflow import train as T

    config = C.from_mapping({"model": "m", "data": "d.json", "output_dir": str(tmp_path / "o"), "epochs": 3})
    older = config.to_dict()
    del older["trust_remote_code"]
    epoch = tmp_path / "o" / "epoch_1"
    epoch.mkdir(parents=True)
    (epoch / T.WORKFLOW_FILE).write_text(json.dumps({"epoch": 1, "config": json.loads(json.dumps(older))}))
    torch.save({}, epoch / T.STATE_FILE)
    assert T._resume_from(config, True)[0] == 1
    changed = C.from_mapping({**config.to_dict(), "trust_remote_code": True})
    with pytest.raises(C.ConfigError, match=r"differs from the one .* in \['trust_remote_code'\]"):
        T._resume_from(changed, True)
