"""output_dir's lock under races (a refused run, a removed lock file, parents made, a dangling link),
and 4-bit layers where modules are shared: assign loads, encoders' fused paths, blocks at two places, extra_files."""

import contextlib
import fcntl
import pathlib

import pytest

from lowrank import shards


def test_a_run_refused_beside_a_running_one_leaves_its_directory_and_lock(tmp_path, monkeypatch):
    # two runs started together: both see output_dir missing; the one refused must not remove it
    d, running, orig, calls = tmp_path / "out", contextlib.ExitStack(), pathlib.Path.mkdir, []

    def mkdir(self, *a, **k):
        orig(self, *a, **k)
        calls.append(self)
        if len(calls) == 1:  # after the refused run's exists() check, the other run takes the lock
            running.enter_context(shards.held_directory(d))

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    with pytest.raises(BlockingIOError), shards.held_directory(d):
        pass
    monkeypatch.setattr(pathlib.Path, "mkdir", orig)
    assert (d / shards.LOCK_FILE).is_file()
    with pytest.raises(BlockingIOError), shards.held_directory(d):  # a third run is still refused
        pass
    running.close()


def test_a_lock_taken_on_a_lock_file_its_holder_removed_is_taken_again(tmp_path, monkeypatch):
    d, first = tmp_path / "out", contextlib.ExitStack()
    first.enter_context(shards.held_directory(d))  # made d: removes it at its end
    real, calls = fcntl.flock, []

    def flock(fd, op):
        calls.append(op)
        if len(calls) == 1:  # the second run opened the lock file; the first ends before its flock
            first.close()
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with shards.held_directory(d):
        monkeypatch.setattr(fcntl, "flock", real)
        assert (d / shards.LOCK_FILE).is_file()
        with pytest.raises(BlockingIOError), shards.held_directory(d):
            pass


def test_load_state_dict_assign_keeps_a_4bit_layers_bias_trainable():
    import torch.nn as nn

    import lowrank

    model = nn.Sequential(nn.Linear(64, 64))
    lowrank.quantize(model)
    model[0].bias.requires_grad_(True)  # bias training
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert model[0].bias.requires_grad  # as nn.Linear's bias keeps its requires_grad under assign=True


def test_an_encoders_4bit_attention_parameter_keeps_its_fused_eval_path_off():
    import torch
    import torch.nn as nn

    import lowrank

    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 1).eval()
    x, mask = torch.randn(2, 5, 64), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        ref = enc(x, src_key_padding_mask=mask)
    lowrank.quantize(enc, lowrank.NF4Config(targets=None, parameters=["layers.0.self_attn.in_proj_weight"]))
    with torch.no_grad():  # the fast path read in_proj_weight, a Weight4bit: AttributeError 'device'
        y = enc(x, src_key_padding_mask=mask)
        assert enc.layers[0](x).shape == x.shape
    assert (y - ref)[0].abs().max() < 0.5 and not y[1, :3].isnan().any()


def test_train_refuses_an_output_dir_that_is_a_link_to_nothing(tmp_path):
    import os

    from lowrank.workflow import train

    link = tmp_path / "out"
    os.symlink(tmp_path / "gone", link)  # held_directory's mkdir: FileExistsError, which _hold leaves to _resume_from
    config = train.TrainConfig(model="m", data="d", output_dir=str(link))
    with contextlib.ExitStack() as held:
        assert train._hold(str(link), held) is None
        with pytest.raises(train.ConfigError, match="not a directory"):  # it ran unheld, writing nowhere
            train._resume_from(config, False)


def test_held_directory_removes_the_parents_it_made_with_the_directory(tmp_path):
    with shards.held_directory(tmp_path / "runs" / "exp" / "out"):
        pass
    assert list(tmp_path.iterdir()) == []  # it left runs/exp behind
    (tmp_path / "runs").mkdir()
    with shards.held_directory(tmp_path / "runs" / "exp" / "out"):
        (tmp_path / "runs" / "other").mkdir()  # made while the block ran: runs stays
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["other"]


def test_a_layer_in_a_block_registered_twice_is_quantized_at_both_places_by_one_name():
    import torch.nn as nn

    import lowrank
    from lowrank.quant.linear4bit import Linear4bit

    block = nn.Sequential(nn.Linear(64, 64))
    model = nn.Sequential(nn.ModuleList([block, block]), nn.Linear(64, 64))  # weight sharing across depth
    # one setattr on the shared block replaces the layer at both places: nothing is untied or left dense
    assert lowrank.quantize(model, lowrank.NF4Config(targets=["0.0.0"])) == ["0.0.0"]
    assert isinstance(model[0][1][0], Linear4bit) and model[0][0] is model[0][1] and isinstance(model[1], nn.Linear)


def test_extra_files_may_bring_a_tokenizer_file_the_export_does_not_write(tmp_path):
    from lowrank import merge_and_export
    from tests.io.test_export import adapted

    _, model = adapted("llama", tmp_path)  # a base directory without tokenizer files
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    merge_and_export(model, tmp_path / "out", extra_files={"chat_template.jinja": tmp_path / "t.jinja"})
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == "{{ messages }}"
    (tmp_path / "base" / "chat_template.jinja").write_text("base's")  # now the export copies the base's: refused
    with pytest.raises(ValueError, match="'chat_template.jinja' is a file the export itself writes"):
        merge_and_export(model, tmp_path / "out2", extra_files={"chat_template.jinja": tmp_path / "t.jinja"})
    assert not (tmp_path / "out2").exists()


def test_eject_leaves_the_nested_path_off_in_an_encoder_quantized_while_it_held_adapters():
    import torch
    import torch.nn as nn

    import lowrank

    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 1)
    lowrank.inject(enc, lowrank.LoraConfig(r=4, targets=["linear1"]))
    lowrank.quantize(enc, lowrank.NF4Config(skip=["linear1"]))  # linear2 in 4 bits
    lowrank.eject(enc)  # turned use_nested_tensor back on: NestedTensors into a Linear4bit
    enc.eval()
    with torch.no_grad():
        y = enc(torch.randn(2, 5, 64), src_key_padding_mask=torch.tensor([[False] * 5, [False] * 3 + [True] * 2]))
    assert not enc.use_nested_tensor and y.shape == (2, 5, 64)
