"""Exports and 4-bit checkpoints of the models users bring: bitsandbytes-loaded layers, remote code
(model and tokenizer), classifiers from a causal LM's directory, mount points, wrong arguments."""

from __future__ import annotations

import copy
import os
import pathlib

import pytest
import torch

import lowrank

transformers = pytest.importorskip("transformers")


def _llama(**kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, **kw)
    return transformers.LlamaForCausalLM(cfg).eval()


def _with_bnb_q_proj(model):
    """`model` with its q_proj as bitsandbytes' own Linear4bit (what BitsAndBytesConfig loads)."""
    bnb = pytest.importorskip("bitsandbytes")
    attn = model.model.layers[0].self_attn
    w = attn.q_proj.weight.detach()
    q = bnb.nn.Linear4bit(64, 64, bias=False, device="meta", compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")._quantize("cpu")
    attn.q_proj = q
    return model


@pytest.mark.parametrize("adapter", [False, True])
def test_export_refuses_bitsandbytes_layers_by_name(tmp_path, adapter):
    """A model transformers loaded with BitsAndBytesConfig holds bitsandbytes' Linear4bit, on which
    lowrank's LoRA trains (lowrank/tuners/lora_base.py, quantized_base). merge_and_export wrote its
    packed uint8 codes as the "plain" weight (and dropped quantization_config: a directory nothing
    loads), or, with an adapter on it, failed with "The size of tensor a (2048) must match ...\"."""
    model = _with_bnb_q_proj(_llama())
    if adapter:
        lowrank.inject(model, lowrank.LoraConfig(r=4, targets=["q_proj"]))
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' is a bitsandbytes Linear4bit.*"
                                         r"load_quantized"):
        lowrank.merge_and_export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_mount_point_target_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """An output directory that is a mount point (a Docker / Kubernetes volume at /output) cannot be
    renamed or swapped: the whole model was written into a temporary directory on the parent's file
    system, then the swap failed with "OSError [Errno 16] Device or resource busy" (checked for real
    under `unshare -m` with a tmpfs). It is refused first, with what to do instead."""
    from lowrank import shards

    target = tmp_path / "volume"
    target.mkdir()
    real = shards.os.path.ismount
    monkeypatch.setattr(shards.os.path, "ismount", lambda p: os.fspath(p) == os.fspath(target) or real(p))
    with pytest.raises(ValueError, match=r"volume is a mount point.*volume/model"):
        lowrank.merge_and_export(_llama(), target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"] and not any(target.iterdir())


@pytest.mark.parametrize("call", ["merge_and_export", "save_quantized", "load_quantized"])
@pytest.mark.parametrize("model", ["meta-llama/Llama-2-7b-hf", {"w": torch.zeros(2)}])
def test_a_path_or_a_state_dict_for_the_model_is_named(tmp_path, call, model):
    """A hub id or a state dict where the model goes gave "AttributeError: 'str' object has no attribute
    'modules'"; quantize already said what it takes."""
    with pytest.raises(TypeError, match=rf"{call} takes the model, an nn.Module; got {type(model).__name__}"):
        getattr(lowrank, call)(model, tmp_path / "out")


def test_a_tokenizer_without_save_pretrained_is_refused_before_writing(tmp_path):
    """A tokenizer given as a path failed with "'str' object has no attribute 'save_pretrained'", after
    every shard was written (then thrown away)."""
    with pytest.raises(TypeError, match=r"tokenizer must be None .* or have save_pretrained; got '/models/tok'"):
        lowrank.merge_and_export(_llama(), tmp_path / "out", tokenizer="/models/tok")
    assert not any(tmp_path.iterdir())


def test_quantize_and_save_quantized_name_bitsandbytes_layers(tmp_path):
    """On a model transformers loaded with BitsAndBytesConfig, quantize said "has a torch.uint8 weight ...:
    cast the model first, e.g. model.float()" and save_quantized "has no 4-bit layers; quantize it with
    lowrank.quantize first" (which then failed so): both now say what the layer is."""
    model = _with_bnb_q_proj(_llama())
    with pytest.raises(TypeError, match=r"'model.layers.0.self_attn.q_proj' is bitsandbytes' Linear4bit, quantized "
                                        r"already.*load_quantized"):
        lowrank.quantize(model)
    assert not any(isinstance(m, lowrank.Linear4bit) for m in model.modules())  # nothing changed
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' is bitsandbytes' own layer.*"
                                         r"save_pretrained"):
        lowrank.save_quantized(model, tmp_path / "q")


@pytest.mark.parametrize("compute_dtype", ["bf16", torch.float64])
def test_load_quantized_refuses_a_compute_dtype_4bit_layers_cannot_take(tmp_path, compute_dtype):
    """Into a model already in 4 bits, load_quantized stored any compute_dtype on every layer without a
    check: the load succeeded and the model's first forward failed ("Invalid device string: 'bf16'")."""
    model = _llama()
    lowrank.quantize(model)
    lowrank.save_quantized(model, tmp_path / "q")
    again = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"compute_dtype must be None or one of .*; got " + repr(compute_dtype)):
        lowrank.load_quantized(again, tmp_path / "q", compute_dtype=compute_dtype)
    assert again.model.layers[0].self_attn.q_proj.compute_dtype == torch.float32


@pytest.mark.parametrize("can_exchange", [True, False])
def test_a_replaced_directory_that_cannot_be_deleted_does_not_fail_the_save(tmp_path, monkeypatch, caplog,
                                                                            can_exchange):
    """Once the new directory is in place, deleting the old contents can fail (on NFS a file still open or
    memory-mapped, e.g. the model's own safetensors when it exports over the directory it was loaded from,
    becomes a .nfsXXXX that cannot be removed). merge_and_export then raised OSError although the export
    had succeeded; now the leftover is named in a warning."""
    import errno
    import logging
    import shutil

    from lowrank import shards

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = shutil.rmtree

    def rmtree(path, ignore_errors=False, **kw):  # the old contents: one file cannot go
        if (pathlib.Path(path) / "old.txt").exists() or (pathlib.Path(path) / "x" / "old.txt").exists():
            if not ignore_errors:
                raise OSError(errno.ENOTEMPTY, "Directory not empty", str(path))
            return
        real(path, ignore_errors=ignore_errors, **kw)

    monkeypatch.setattr(shards.shutil, "rmtree", rmtree)
    if not can_exchange:
        monkeypatch.setattr(shards, "exchange", lambda a, b: False)
    with caplog.at_level(logging.WARNING, logger="lowrank"):
        result = lowrank.merge_and_export(_llama(), out, overwrite=True)
    assert result.files == ["model.safetensors"] and (out / "config.json").exists() and not (out / "old.txt").exists()
    assert "could not delete all of" in caplog.text


@pytest.mark.parametrize("write", ["merge_and_export", "save_quantized"])
def test_config_names_the_class_of_the_model_written(tmp_path, write):
    """A classifier fine-tuned from a causal LM's directory kept that directory's architectures
    (["LlamaForCausalLM"]) in the config written, where save_pretrained writes the model's own class:
    whatever builds the model from config.json (lowrank merge, pipelines, serving) then built a causal LM,
    dropped the trained `score` head and left a random lm_head."""
    _llama(pad_token_id=0).save_pretrained(tmp_path / "causal")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "causal", num_labels=3)
    assert model.config.architectures == ["LlamaForCausalLM"]
    if write == "save_quantized":
        lowrank.quantize(model)
    getattr(lowrank, write)(model, tmp_path / "out")
    written = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert written.architectures == ["LlamaForSequenceClassification"]
    assert model.config.architectures == ["LlamaForCausalLM"]  # the user's model is not changed


@pytest.mark.parametrize("write", ["merge_and_export", "save_quantized"])
def test_a_model_with_its_own_code_is_written_with_that_code(tmp_path, write):
    """A trust_remote_code model (InternLM's kind: model_type and classes in its directory) was written
    with config.json's auto_map naming modeling_internlm.py but without the file (save_pretrained copies
    it): the merged directory failed to load, "does not appear to have a file named modeling_internlm.py"."""
    from tests.workflow.test_models_and_options import remote_copy

    _llama().save_pretrained(tmp_path / "plain")
    remote = remote_copy(tmp_path / "plain", tmp_path / "remote")
    model = transformers.AutoModelForCausalLM.from_pretrained(remote, trust_remote_code=True)
    if write == "save_quantized":
        lowrank.quantize(model)
    else:
        lowrank.inject(model, lowrank.LoraConfig(r=4, targets=["q_proj"]))
    getattr(lowrank, write)(model, tmp_path / "out")
    assert (tmp_path / "out" / "modeling_internlm.py").is_file()
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True,
                                                              device_map="cpu")
    assert type(again).__name__ == "InternLMForCausalLM"


def test_a_tokenizer_with_its_own_code_is_copied_with_that_code(tmp_path):
    """A base whose tokenizer is its own class (tokenizer_config.json's auto_map, trust_remote_code:
    InternLM's tokenization_internlm.py): the export copied the tokenizer files but not the code they
    name, and AutoTokenizer could not load the merged directory."""
    import json

    from tests.io.export_helpers import tokenizer

    base = tmp_path / "base"
    _llama().save_pretrained(base)
    tokenizer().save_pretrained(base)
    (base / "tokenization_custom.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\nclass CustomTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n")
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]}
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    lowrank.inject(model, lowrank.LoraConfig(r=4, targets=["q_proj"]))
    lowrank.merge_and_export(model, tmp_path / "out")
    assert (tmp_path / "out" / "tokenization_custom.py").read_bytes() == (base / "tokenization_custom.py").read_bytes()
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert type(loaded).__name__ == "CustomTokenizer" and loaded("w1 w2")["input_ids"] == [1, 2]


def test_4bit_and_dense_checkpoints_sent_to_the_other_loader_say_so(tmp_path):
    """load_and_quantize on a checkpoint in 4 bits already listed its layers' weights as missing and
    its quant-state tensors as unexpected; load_quantized on a dense one loaded it dense without a word."""
    model = _llama()
    lowrank.quantize(model)
    lowrank.save_quantized(model, tmp_path / "4bit")
    _llama().save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match=r"holds 4-bit weights already \('model.layers.0.*quant_state.bitsandbytes__nf4'"
                                         r"\): load_and_quantize quantizes a dense checkpoint; read this one with "
                                         "lowrank.load_quantized"):
        lowrank.load_and_quantize(_llama(), tmp_path / "4bit")
    with pytest.warns(UserWarning, match="dense holds no 4-bit weight: its tensors are loaded as they are"):
        assert lowrank.load_quantized(_llama(), tmp_path / "dense") == []


def test_merge_copies_the_tokenizer_code_of_an_old_format_auto_map(tmp_path):
    # tokenizer_config.json's auto_map as a bare [slow, fast] list, the old format transformers still reads as
    # {"AutoTokenizer": [...]}: it was an AttributeError ('list' object has no attribute 'values') inside the swap
    import json
    import types

    from lowrank import export_files

    src, out = tmp_path / "base", tmp_path / "out"
    src.mkdir(), out.mkdir()
    (src / "tokenizer_config.json").write_text(json.dumps({"auto_map": ["tokenization_x.XTokenizer", None]}))
    (src / "tokenization_x.py").write_text("class XTokenizer: ...\n")
    (src / "evil.py").write_text("")
    model = types.SimpleNamespace(config=types.SimpleNamespace(_name_or_path=str(src)))
    export_files.write_tokenizer(model, out, None)
    assert sorted(p.name for p in out.iterdir()) == ["tokenization_x.py", "tokenizer_config.json"]
    # a module path that leaves the directory is not a file of it
    (src / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["../base/evil.T", None]}}))
    assert export_files._tokenizer_code(src) == ()


def test_merge_copies_the_modules_the_tokenizer_code_imports(tmp_path):
    # tokenization_x.py doing `from .configuration_x import ...` (InternLM-style remote code): only the module
    # auto_map names was copied, and AutoTokenizer(trust_remote_code=True) failed on the missing import
    import json
    import types

    from lowrank import export_files

    src, out = tmp_path / "base", tmp_path / "out"
    src.mkdir(), out.mkdir()
    (src / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_x.X", None]}}))
    (src / "tokenization_x.py").write_text("from .vocab_x import V\n\nclass X: ...\n")
    (src / "vocab_x.py").write_text("from .words_x import W\n\nV = W\n")  # and what that imports
    (src / "words_x.py").write_text("W = 1\n")
    (src / "unrelated.py").write_text("")
    model = types.SimpleNamespace(config=types.SimpleNamespace(_name_or_path=str(src)))
    export_files.write_tokenizer(model, out, None)
    assert sorted(p.name for p in out.iterdir()) == ["tokenization_x.py", "tokenizer_config.json", "vocab_x.py",
                                                     "words_x.py"]
