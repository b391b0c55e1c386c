"""`lowrank merge BASE ADAPTER OUT` end to end, in a subprocess (`python -m lowrank`): a tiny
Llama and its tokenizer saved with save_pretrained, a PEFT-format adapter, and the merged
directory loaded back by transformers (tolerance: Note: the export tolerance)."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import lowrank  # noqa: E402
from lowrank.cli import main  # noqa: E402
from tests.io.export_helpers import assert_export_close, reference64, saved_base, tokenizer  # noqa: E402
from tests.tuners import models  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


def lowrank_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "lowrank", *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_merge_command(tmp_path):
    base = saved_base("llama", tmp_path / "base")
    tokenizer().save_pretrained(tmp_path / "base")
    plain = copy.deepcopy(base)
    lowrank.inject(base, lowrank.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], dora=True))
    models.randomize_adapters(base)
    lowrank.save_adapter(base, tmp_path / "adapter")
    done = lowrank_cli("merge", tmp_path / "base", tmp_path / "adapter", tmp_path / "out", "--max-shard-size", "40KB",
                       "--dtype", "fp32")
    assert done.returncode == 0, done.stderr
    assert "merged 4 modules" in done.stdout
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "model.safetensors.index.json" in files and "config.json" in files and "tokenizer.json" in files
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = models.ids(batch=4, seq=16)
    assert_export_close(exported, base, reference64(plain, base, tmp_path), x)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("w1 w5 w7")["input_ids"] == [1, 5, 7]


def test_merge_command_on_a_4bit_base(tmp_path):
    """BASE a bitsandbytes 4-bit directory (save_quantized): the command loads it with
    load_quantized and writes what merge_and_export writes for the same model, tensor for tensor."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = saved_base("llama", tmp_path / "dense" / "base", torch.bfloat16)
    lowrank.quantize(model, lowrank.NF4Config(compute_dtype=torch.bfloat16))
    lowrank.save_quantized(model, tmp_path / "nf4" / "base")  # the same name: the adapter's base check passes
    lowrank.inject(model, lowrank.LoraConfig(r=4, targets=["q_proj", "v_proj"]), dtype=torch.float32)  # as the command
    models.randomize_adapters(model)
    lowrank.save_adapter(model, tmp_path / "adapter")
    lowrank.merge_and_export(model, tmp_path / "expected")
    done = lowrank_cli("merge", tmp_path / "nf4" / "base", tmp_path / "adapter", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "dtype bfloat16" in done.stdout
    got = safetensors_torch.load_file(tmp_path / "out" / "model.safetensors")
    expected = safetensors_torch.load_file(tmp_path / "expected" / "model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_merge_command_on_a_base_with_4bit_experts(tmp_path):
    """BASE a 4-bit directory whose MoE experts are 4-bit parameters too (save_quantized, Note:
    4-bit parameters on disk), ADAPTER LoRA on the experts and the attention: the command writes
    what merge_and_export writes for the same model, tensor for tensor (the experts dense, merged)."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from tests.quant.test_params4bit import EXPERTS, mixtral

    model = mixtral()
    model.config.architectures = ["MixtralForCausalLM"]
    lowrank.quantize(model, lowrank.NF4Config(targets=["q_proj", "v_proj"], parameters=EXPERTS))
    lowrank.save_quantized(model, tmp_path / "base")
    lowrank.inject(model, lowrank.LoraConfig(r=4, targets=["q_proj"], parameters=EXPERTS), dtype=torch.float32)
    models.randomize_adapters(model)
    lowrank.save_adapter(model, tmp_path / "adapter")
    lowrank.merge_and_export(model, tmp_path / "expected")
    done = lowrank_cli("merge", tmp_path / "base", tmp_path / "adapter", tmp_path / "out", "--allow-other-base")
    assert done.returncode == 0, done.stderr
    got = safetensors_torch.load_file(tmp_path / "out" / "model.safetensors")
    expected = safetensors_torch.load_file(tmp_path / "expected" / "model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj" in got and got["model.layers.0.mlp.experts.gate_up_proj"].dim() == 3
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_merge_command_errors_are_one_line(tmp_path, capsys):
    saved_base("llama", tmp_path / "base")
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "lowrank merge" in line]
    assert len(err) == 1 and err[0].startswith("lowrank merge: error:") and "nowhere" in err[0]  # no traceback
    assert main(["merge", str(tmp_path), str(tmp_path / "base"), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: a bad --dtype is a usage error
        main(["merge", "a", "b", "c", "--dtype", "int4"])
    from lowrank.export import DTYPES  # torch's names too, as lowrank train / chat take them
    assert DTYPES["bfloat16"] is DTYPES["bf16"] and DTYPES["float32"] is DTYPES["fp32"]
    # other OSErrors (not FileNotFoundError / FileExistsError) were tracebacks with exit 1
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    lowrank.inject(base, lowrank.LoraConfig(targets=["q_proj"]))
    lowrank.save_adapter(base, tmp_path / "adapter")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_bytes((tmp_path / "base" / "config.json").read_bytes())
    for args, said in [(["base", "adapter", "a_file"], "a_file exists and is not a directory"),
                       (["no_weights", "adapter", "out"], "no_weights")]:
        assert main(["merge", *[str(tmp_path / a) for a in args]]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert err[-1].startswith("lowrank merge: error:") and said in err[-1] and "Traceback" not in "".join(err)
    assert not (tmp_path / "out").exists()
    assert json.loads((tmp_path / "base" / "config.json").read_text())["model_type"] == "llama"


def test_merge_command_keeps_the_head_of_the_class_saved(tmp_path):
    """BASE saved from a model with a head (here a sequence classifier): the command loads that
    class, not the bare encoder, so the adapter's names fit and OUT holds the head; before, it loaded
    AutoModel and refused the adapter. OUT equals merge_and_export of the same model, tensor for
    tensor, and lowrank train's workflow file comes along (lowrank chat finds its template there)."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_labels=3)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "base")
    model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    lowrank.inject(model, lowrank.LoraConfig(r=4, targets=["query", "value"]), dtype=torch.float32)  # as the command
    models.randomize_adapters(model)
    lowrank.save_adapter(model, tmp_path / "adapter")
    (tmp_path / "adapter" / "lowrank_workflow.json").write_text('{"config": {"template": "chatml"}}')
    lowrank.merge_and_export(model, tmp_path / "expected")
    done = lowrank_cli("merge", tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "dtypes as the base" in done.stdout
    got = safetensors_torch.load_file(tmp_path / "out" / "model.safetensors")
    expected = safetensors_torch.load_file(tmp_path / "expected" / "model.safetensors")
    assert "classifier.weight" in got and got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert json.loads((tmp_path / "out" / "lowrank_workflow.json").read_text()) == {"config": {"template": "chatml"}}


def test_merge_command_on_an_architecture_name_transformers_does_not_export(tmp_path):
    """MPT's config says "MPTForCausalLM" (the class is MptForCausalLM), old LLaMA conversions
    "LLaMAForCausalLM": such a base loads as a causal LM by the name's ending, head included."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    base = saved_base("llama", tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**config, "architectures": ["LLaMAForCausalLM"]}))
    lowrank.inject(base, lowrank.LoraConfig(r=4, targets=["q_proj"]))
    models.randomize_adapters(base)
    lowrank.save_adapter(base, tmp_path / "adapter")
    done = lowrank_cli("merge", tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "lm_head.weight" in safetensors_torch.load_file(tmp_path / "out" / "model.safetensors")


def test_merge_command_on_an_unexported_head_name_keeps_the_head_or_says_why(tmp_path):
    """An unexported classifier name loads by its ending (AutoModelForSequenceClassification); a
    name with no known ending is an error, not a bare model that silently drops the head."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_labels=3)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "base")
    model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    lowrank.inject(model, lowrank.LoraConfig(r=4, targets=["query"]))
    lowrank.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**config, "architectures": ["BERTForSequenceClassification"]}))
    done = lowrank_cli("merge", tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    (tmp_path / "base" / "config.json").write_text(json.dumps({**config, "architectures": ["BERTWithSomethingElse"]}))
    done = lowrank_cli("merge", tmp_path / "base", tmp_path / "adapter", tmp_path / "out2")
    assert done.returncode == 2 and "does not have; set one it has there" in done.stderr
