"""Encoding, cutting, bucketing and the accumulated loss."""

import copy

import pytest
import torch

from lowrank.workflow import batches as B
from lowrank.workflow.data import DataError, Turn
from lowrank.workflow.template import IGNORE
from lowrank.workflow.train import schedule, step_loss

from . import tiny

RECORDS = [tuple(Turn(t["input"], t["output"], t.get("system")) for t in c["conversation"]) for c in tiny.CONVERSATIONS]


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


def test_cutting_is_counted_and_keeps_the_front(tok):
    full = B.encode_all(tok, None, RECORDS, 10_000)
    assert full.truncated == 0
    longest = max(len(ids) for ids, _ in full.examples)
    limit = longest - 3
    cut = B.encode_all(tok, None, RECORDS, limit)
    assert cut.truncated == sum(len(ids) > limit for ids, _ in full.examples) >= 1
    for (ids, labels), (fids, flabels) in zip(cut.examples, full.examples):
        assert ids == fids[:limit] and labels == flabels[:limit]
    assert cut.tokens == sum(min(len(ids), limit) for ids, _ in full.examples)


def test_a_record_with_no_answer_left_is_an_error(tok):
    records = [RECORDS[3], RECORDS[1]]  # record 1 has a system prompt, so a longer prompt
    first = [next(i for i, y in enumerate(labels) if y != IGNORE) for _, labels in
             B.encode_all(tok, None, records, 10_000).examples]
    assert first[0] < first[1]
    B.encode_all(tok, None, records, first[1] + 1)  # one answer token left: fine
    with pytest.raises(DataError, match=f"d.json: record 1: no output token lies within max_length={first[1]}"):
        B.encode_all(tok, None, records, first[1], source="d.json")


def test_a_record_the_template_refuses_is_named(tok):
    # templates such as Gemma's and Mistral's raise_exception on a system message
    t = copy.copy(tok)
    t.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                       "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}|{% endfor %}")
    records = [RECORDS[3], RECORDS[1]]
    assert records[1][0].system and not records[0][0].system
    with pytest.raises(DataError, match="d.json: record 1: the tokenizer's chat template refused it: System role not"):
        B.encode_all(t, None, records, 10_000, source="d.json")


def test_batches_cover_every_record_once_and_depend_on_seed_and_epoch_only():
    lengths = [int(x) for x in torch.randint(5, 300, (203,), generator=torch.Generator().manual_seed(1))]
    a = B.epoch_batches(lengths, 4, seed=3, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(203))
    assert a == B.epoch_batches(lengths, 4, seed=3, epoch=1)
    assert a != B.epoch_batches(lengths, 4, seed=3, epoch=2) and a != B.epoch_batches(lengths, 4, seed=4, epoch=1)
    # length bucketing: padding is far below that of a random split into batches of 4
    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(203, generator=g).tolist()
    assert padding(a) < padding([order[i:i + 4] for i in range(0, 203, 4)]) / 4


def test_collate_pads_right_and_never_trains_padding():
    examples = [([5, 6, 7], [IGNORE, 6, 7]), ([8], [IGNORE])]
    b = B.collate(examples, [1, 0], pad_id=0)
    assert b["input_ids"].tolist() == [[8, 0, 0], [5, 6, 7]]
    assert b["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert b["labels"].tolist() == [[IGNORE] * 3, [IGNORE, 6, 7]]


def test_accumulated_micro_batches_equal_one_batch(tok):
    """Two micro-batches give the gradient of one batch of them all: the loss is a sum over
    trained tokens divided by their count in the whole step, whichever way it is split."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    enc = B.encode_all(tok, None, RECORDS, 128)
    pad = B.pad_id(tok)

    def grads(micro):
        model.zero_grad()
        loss, count = step_loss(model, [B.collate(enc.examples, m, pad) for m in micro])
        return loss, count, torch.cat([p.grad.flatten() for p in model.parameters()])

    everything = list(range(len(RECORDS)))
    one, count1, g1 = grads([everything])
    two, count2, g2 = grads([everything[:2], everything[2:]])
    assert count1 == count2 == enc.trained
    # the same float32 terms summed in another order (and padded rows the other split lacks):
    # differences are rounding, a few ulps of the largest gradient entries
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=0)
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-5 * g1.abs().max().item())


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays(kind):
    from lowrank.workflow.config import TrainConfig

    f = schedule(TrainConfig(model="m", data="d", output_dir="o", schedule=kind, warmup_ratio=0.1), 100)
    values = [f(s) for s in range(100)]
    assert values[:10] == sorted(values[:10]) and values[9] < 1 and values[10] == 1.0
    assert values[10:] == (sorted(values[10:], reverse=True) if kind != "constant" else [1.0] * 90)
    assert values[-1] < 0.05 if kind != "constant" else values[-1] == 1.0


def test_a_record_the_tokenizer_cannot_encode_is_named(tok):
    # "\ud800" is valid JSON (data.load refuses it, naming the field); the fast tokenizer's own error
    # ("TextEncodeInput must be ...") named nothing
    records = [RECORDS[3], (Turn("a", "b"), Turn("bad \ud800 text", "c"))]
    with pytest.raises(DataError, match=r"d.json: record 1: the tokenizer could not encode it: "):
        B.encode_all(tok, None, records, 10_000, source="d.json")


def test_a_record_the_template_renders_otherwise_is_named(tok):
    # Mistral v0.3's way: the system prompt goes into the last user message, so it moves once a turn is added
    t = copy.copy(tok)
    t.chat_template = ("{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else none %}"
                       "{% set msgs = messages[1:] if sys is not none else messages %}"
                       "{% set last = namespace(i=0) %}{% for m in msgs %}{% if m['role'] == 'user' %}"
                       "{% set last.i = loop.index0 %}{% endif %}{% endfor %}"
                       "{% for m in msgs %}{% if m['role'] == 'user' %}[U]{% if sys and loop.index0 == last.i %}"
                       "{{ sys }}\n{% endif %}{{ m['content'] }}{% else %}[A]{{ m['content'] }}{{ eos_token }}"
                       "{% endif %}{% endfor %}{% if add_generation_prompt %}[A]{% endif %}")
    records = [RECORDS[3], RECORDS[1], RECORDS[0]]  # only record 2 has a system prompt and two turns
    B.encode_all(t, None, records[:2], 10_000)
    with pytest.raises(DataError, match="d.json: record 2: the tokenizer's chat template renders turns before turn 1 "
                                        "differently"):
        B.encode_all(t, None, records, 10_000, source="d.json")


def test_a_tokenizer_error_names_the_record(tok, monkeypatch):
    real = B.encode

    def failing(tokenizer, template, turns):
        if turns[0].input == RECORDS[1][0].input:
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        return real(tokenizer, template, turns)

    monkeypatch.setattr(B, "encode", failing)
    with pytest.raises(DataError, match=r"d.json: record 1: the tokenizer could not encode it: TypeError: TextEncode"):
        B.encode_all(tok, None, [RECORDS[3], RECORDS[1]], 10_000, source="d.json")
