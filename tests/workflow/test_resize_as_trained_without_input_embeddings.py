"""resize_as_trained, which chat, web and merge call before loading any adapter, read the base's
input-embedding rows first, whatever the adapter: a transformers model that names no input
embedding (remote code whose embedding is not `embed_tokens`: get_input_embeddings raises
NotImplementedError) could no longer be chatted with or merged with any adapter, a LoRA on its
linear layers included, though load_adapter takes it (merge read the rows only to report a
resize, until 2026-11-30). Such a model is now left as it is, and the adapter loads."""

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import lowrank  # noqa: E402
from lowrank.workflow.model import resize_as_trained  # noqa: E402


class Config(transformers.PretrainedConfig):
    model_type = "lowrank-test-wte"


class Wte(transformers.PreTrainedModel):
    """A model whose embedding is `wte`, which transformers' default get_input_embeddings does not find."""

    config_class = Config

    def __init__(self, config):
        super().__init__(config)
        self.wte, self.proj, self.head = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10)
        self.post_init()

    def forward(self, input_ids):
        return self.head(self.proj(self.wte(input_ids)))


def test_an_adapter_loads_onto_a_model_without_get_input_embeddings(tmp_path, capsys):
    torch.manual_seed(0)
    base = Wte(Config())
    trained = copy.deepcopy(base)
    with pytest.raises(NotImplementedError):  # the case: transformers cannot say which module it is
        trained.get_input_embeddings()
    lowrank.inject(trained, lowrank.LoraConfig(r=2, targets=["proj"]))
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_" in n:
                p.normal_()
    lowrank.save_adapter(trained, tmp_path / "adapter")

    fresh = copy.deepcopy(base)
    resize_as_trained(fresh, tmp_path / "adapter", tokens=12)  # nothing to size by: no error, no resize
    assert fresh.wte.weight.shape == (10, 8) and capsys.readouterr().out == ""
    lowrank.load_adapter(fresh, tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids), trained.eval()(ids))
