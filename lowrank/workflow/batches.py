"""Tokenized conversations -> padded batches of similar length (length bucketing).

Every record is encoded with the chat template (lowrank.workflow.template), cut to
`max_length` tokens and counted when cut. The order of batches is a function of the seed and
the epoch only, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses

import torch

from .data import DataError
from .template import IGNORE, Refused, TemplateError, check_answers, check_template, encode

BUCKET = 64  # batches sorted together: long enough to group similar lengths, short enough to stay random


@dataclasses.dataclass(frozen=True)
class Encoded:
    examples: list  # (input_ids, labels) per record, each at most max_length long
    truncated: int  # records cut to max_length
    tokens: int  # all tokens after cutting
    trained: int  # tokens that count in the loss


def encode_all(tokenizer, template: str | None, records, max_length: int, source: str = "data") -> Encoded:
    """Encode and cut every record; DataError naming `source` and the record for a record the
    tokenizer or its template cannot encode, or whose answers all lie past the cut."""
    check_template(template, tokenizer)  # the template itself: an error of the config, not of a record
    examples, truncated = [], 0
    for i, turns in enumerate(records):
        try:
            check_answers(tokenizer, turns)
            ids, labels = encode(tokenizer, template, turns)
        except Refused as e:  # e.g. raise_exception('Conversation roles must alternate ...') in the template
            raise DataError(f"{source}: record {i}: the tokenizer's chat template refused it: {e.__cause__}") from e
        except TemplateError as e:  # the template renders this record otherwise than training needs
            raise DataError(f"{source}: record {i}: {e}") from e
        except (TypeError, ValueError) as e:  # the tokenizer's own, which name no record
            raise DataError(f"{source}: record {i}: the tokenizer could not encode it: {type(e).__name__}: {e}") from e
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(x == IGNORE for x in labels[1:]):  # the first label never counts: nothing predicts it
            raise DataError(f"{source}: record {i}: no output token lies within max_length={max_length} (the record has "
                            f"{len(encode(tokenizer, template, turns)[0])} tokens); raise max_length or shorten it")
        examples.append((ids, labels))
    tokens = sum(len(ids) for ids, _ in examples)
    trained = sum(sum(x != IGNORE for x in labels[1:]) for _, labels in examples)
    return Encoded(examples, truncated, tokens, trained)


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of each batch of one epoch: shuffle, sort each bucket of BUCKET batches by
    length, cut into batches, shuffle the batches; all from (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    span = batch_size * BUCKET
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def collate(examples, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE on padding), each (B, T)."""
    width = max(len(examples[i][0]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(indices), width), IGNORE, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(indices), width), dtype=torch.long)  # (B, T)
    for row, i in enumerate(indices):
        x, y = examples[i]
        ids[row, :len(x)] = torch.tensor(x)
        labels[row, :len(y)] = torch.tensor(y)
        mask[row, :len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        if getattr(tokenizer, name, None) is not None:
            return getattr(tokenizer, name)
    return 0  # padded positions are masked out and never trained; any id serves
