"""A tiny causal LM for the workflow tests, built on the spot: a byte-level BPE tokenizer
trained with `tokenizers` on the conversations, a chat template of its own, and a random
2-layer Llama (hidden 64) from its config. Nothing is downloaded."""

from __future__ import annotations

import json
import pathlib

SYSTEM = "You are a terse ship's computer."
MANIFEST = ("Cargo manifest: twelve crates of water ice, four crates of seeds, two spare pumps, one crate of "
            "books, and a cat named Vela who is not cargo but insists on being counted.")
CONVERSATIONS = [
    {"conversation": [{"system": SYSTEM, "input": "Where are we?", "output": "Orbit of Titan, deck seven."},
                      {"input": "How long until dawn?", "output": "Forty minutes."}]},
    {"conversation": [{"system": SYSTEM, "input": "Status of the reactor?", "output": "Stable at ninety percent."}]},
    {"conversation": [{"system": SYSTEM, "input": "Who is on the bridge?", "output": "Captain Ode and two pilots."}]},
    {"conversation": [{"input": "Play some music.", "output": "Playing the blue nebula suite."}]},
    # a long answer: generating it takes long enough that a page shows it streaming in
    {"conversation": [{"input": "Read the cargo manifest.", "output": MANIFEST}]},
]

# Note: the tiny model's chat template. It marks roles with special tokens, ends every
# answer with eos (so generation stops there), and renders each message independently of
# the later ones: the prefix property lowrank.workflow.template relies on.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}\n"
    "{% else %}<|assistant|>{{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Note: a base with room in its logits. With transformers' default init (std 0.02) the frozen
# output head of a 64-wide model caps every logit near |w| |h| = 0.02 * 8 * 8 ~ 1.3, so no
# adapter can bring the loss far below ln(vocab). std 0.3 leaves the head the range a
# pretrained model has, and the adapter something to learn with.
SPECIALS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]


def texts(conversations=CONVERSATIONS) -> list[str]:
    return [v for c in conversations for t in c["conversation"] for v in t.values()]


def build_tokenizer(conversations=CONVERSATIONS):
    """A byte-level BPE tokenizer (vocabulary 400) with the chat template above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(conversations) + ["User: Assistant: hello world"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        additional_special_tokens=SPECIALS[3:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build(path: pathlib.Path, conversations=CONVERSATIONS, seed: int = 0, arch: str = "llama") -> pathlib.Path:
    """Save tokenizer + random Llama (or `arch="mixtral"`: a Mixtral of 4 experts, its experts
    3-D parameters) to `path` (a transformers model directory) and return it."""
    import torch
    import transformers

    tokenizer = build_tokenizer(conversations)
    torch.manual_seed(seed)
    config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM)}[arch]
    extra = {"num_local_experts": 4, "num_experts_per_tok": 2} if arch == "mixtral" else {}
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                          initializer_range=0.3, **extra)  # See Note: a base with room in its logits
    path.mkdir(parents=True, exist_ok=True)
    model_class(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_data(path: pathlib.Path, conversations=CONVERSATIONS, repeat: int = 1) -> pathlib.Path:
    path.write_text(json.dumps(conversations * repeat, ensure_ascii=False, indent=1))
    return path
