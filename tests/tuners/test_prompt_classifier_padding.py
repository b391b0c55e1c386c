"""Prompt tuning on a decoder classifier (docs/prompt.md, Decoder classifiers): the model pools its
last position, since it gets inputs_embeds and cannot find the padding. Left padding with position
ids from the mask gives each row what it gives alone; right padding pools a padding token."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lowrank  # noqa: E402


def test_left_padding_with_positions_is_the_row_alone_and_right_padding_is_not():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   num_labels=3, pad_token_id=0)
    model = transformers.LlamaForSequenceClassification(cfg).eval()
    lowrank.inject(model, lowrank.PromptConfig(num_virtual_tokens=4))
    longer = [5, 6, 7, 8, 9]
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([[5, 6, 7]])).logits[0]
        mask = torch.tensor([[0, 0, 1, 1, 1], [1] * 5])
        left = model(input_ids=torch.tensor([[0, 0, 5, 6, 7], longer]), attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[0]
        right = model(input_ids=torch.tensor([[5, 6, 7, 0, 0], longer]), attention_mask=mask.flip(-1)).logits[0]
    torch.testing.assert_close(left, alone, rtol=0, atol=1e-6)  # float32 sums in another order, no more
    assert (right - alone).abs().max() > 1e-2  # the padding token's logits: the limit the docs describe
