"""Streamed generation for chat: the prompt is encoded exactly as in training (template.py),
then one token at a time with the model's key/value cache, each new piece of text yielded as
soon as it is whole (no half UTF-8 character, no half stop mark). Generation ends at the
template's end mark (template.stop_text), the tokenizer's eos token or one of the model's
generation_config eos ids. The whitespace a template writes before an answer (plain's space
after "Assistant:", Llama 2's after [/INST]) is not shown or kept: the history holds the answer
as training did."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch

from .data import Turn
from .model import virtual_tokens
from .template import answer_lead, encode, stop_text


@dataclasses.dataclass(frozen=True)
class Settings:
    max_new_tokens: int = 256  # a few paragraphs; the web page's slider goes to 2048
    temperature: float = 0.0  # 0: greedy, the same answer every time (what tests and demos want)
    top_p: float = 1.0  # nucleus sampling mass when temperature > 0; 1 keeps every token
    top_k: int = 0  # sample among the k likeliest when temperature > 0; 0: no limit
    seed: int = 0  # sampling RNG, so a sampled chat can be replayed

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1; got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0; got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0; got {self.top_k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -2**63 <= self.seed < 2**64:
            # torch.Generator.manual_seed's range; past it every answer failed ("Overflow when unpacking long long")
            raise ValueError(f"seed must be an integer from -2**63 to 2**64 - 1; got {self.seed!r}")


def _pick(logits: torch.Tensor, s: Settings, g: torch.Generator) -> int:
    """Next token from logits (V,): argmax, or a sample after temperature / top-k / top-p."""
    if s.temperature == 0:
        return int(logits.argmax())
    # on the CPU, where the generator is: torch.multinomial refuses a CPU generator for CUDA probabilities
    # ("Expected a 'cuda' device type for generator"), and a seed draws the same token on either device
    probs = torch.softmax(logits.float().cpu() / s.temperature, -1)  # (V,)
    if s.top_k:
        probs[probs < torch.topk(probs, min(s.top_k, probs.numel())).values[-1]] = 0
        probs /= probs.sum()  # top-p takes its mass among the k kept, as transformers' TopK then TopP warpers do
    if s.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(0) - sorted_p >= s.top_p  # tokens after the nucleus is full
        probs[order[outside]] = 0
    return int(torch.multinomial(probs / probs.sum(), 1, generator=g))


# Note: a history longer than the context. A chat keeps every exchange, but the model sees at
# most max_position_embeddings tokens, less the virtual tokens of an active prompt or prefix
# (which take positions before the text). Before each answer the oldest exchanges are dropped
# until the prompt leaves room for min(max_new_tokens, a quarter of the context) new tokens;
# the answer stops at the context's end; a message too long on its own is an error.
@torch.no_grad()
def stream(model, tokenizer, template: str | None, history: Sequence[Turn], message: str,
           system: str | None = None, settings: Settings = Settings()) -> Iterator[str]:
    """Pieces of the answer to `message` after `history` (system prompt on the first turn).
    See Note: a history longer than the context."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None:
        limit -= virtual_tokens(model)
    turns = list(history) + [Turn(input=message, output=None)]
    while True:
        # "" too: an empty system prompt, as training renders one (template.py)
        shown = [dataclasses.replace(turns[0], system=system)] + turns[1:] if system is not None else turns
        ids, _ = encode(tokenizer, template, shown)
        if limit is None or len(ids) + min(settings.max_new_tokens, limit // 4) <= limit or len(turns) == 1:
            break
        turns = turns[1:]  # the oldest exchange goes first
    if limit is not None and len(ids) >= limit:
        raise ValueError(f"the message is {len(ids)} tokens with its template; the model's context holds {limit}")
    stop, lead = stop_text(tokenizer, template), answer_lead(tokenizer, template)
    ends = {getattr(tokenizer, "eos_token_id", None), *_eos_ids(model)} - {None}
    if stop and len(mark := tokenizer(stop, add_special_tokens=False)["input_ids"]) == 1:
        ends.add(mark[0])  # a stop mark that is one (often special, so undecoded) token
    g = torch.Generator().manual_seed(settings.seed)
    device = next(model.parameters()).device
    x, past, out, sent = torch.tensor([ids], device=device), {}, [], 0
    for _ in range(settings.max_new_tokens if limit is None else min(settings.max_new_tokens, limit - len(ids))):
        result = model(input_ids=x, use_cache=True, **past)
        # Note: the cache's name. transformers 5.x returns (and takes) `cache`; earlier
        # versions `past_key_values`. Whichever the output holds is passed back.
        past = {"cache": result.cache} if "cache" in result else {"past_key_values": result.past_key_values}
        token = _pick(result.logits[0, -1], settings, g)
        if token in ends:
            break
        out.append(token)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if stop and stop in text:
            yield text[sent:text.index(stop)]
            return
        sent = max(sent, len(lead) if lead and text.startswith(lead) else 0)  # the template's, not the answer's
        # hold back an incomplete character and any tail that may be the start of the stop mark
        partial = max((k for k in range(1, len(stop or "")) if text.endswith(stop[:k])), default=0)
        keep = len(text) - max(partial, 1 if text.endswith("\ufffd") else 0)
        if keep > sent:
            yield text[sent:keep]
            sent = keep
        x = torch.tensor([[token]], device=device)
    text = tokenizer.decode(out, skip_special_tokens=True)
    sent = max(sent, len(lead) if lead and text.startswith(lead) else 0)
    if len(text) > sent:
        yield text[sent:]


def _eos_ids(model) -> list[int]:
    """The ids the model's generation_config ends generation at (an int or a list, as transformers
    allows): Llama 3 Instruct's lists <|eot_id|> beside its tokenizer's eos, for instance."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
