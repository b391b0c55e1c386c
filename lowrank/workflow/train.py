"""`lowrank train CONFIG`: fine-tune a causal LM on conversations with one lowrank method.

    check config and data -> load base -> (quantize) -> inject -> encode -> for each epoch:
    batches -> loss on output tokens -> AdamW step -> checkpoint epoch_<n>/ -> summary

Every check runs before the first step; a bad config or record is one error. A checkpoint is
a PEFT adapter directory (methods.py) plus `lowrank_workflow.json` (this run's config) and
`trainer_state.pt` (optimizer, schedule, RNG, adapter tensors), written whole or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from ..io import save_adapter
from . import data as data_mod
from .batches import collate, encode_all, epoch_batches, pad_id
from .config import ConfigError, TrainConfig
from .methods import load_trainable
from .model import WORKFLOW_FILE, apply_method, load_base
from .progress import Progress
from .template import IGNORE, check_template

STATE_FILE = "trainer_state.pt"
EPOCH_DIR = re.compile(r"epoch_(\d+)")
RESUMABLE = ("epochs", "log_every", "output_dir", "device")  # fields --resume lets differ from the checkpoint's


@dataclasses.dataclass(frozen=True)
class Summary:
    epochs: int
    steps: int
    records: int
    truncated: int  # records cut to max_length
    tokens: int  # tokens seen, all epochs of this run
    trained_tokens: int  # of which counted in the loss
    loss: float  # mean loss per trained token over the last epoch
    seconds: float
    tokens_per_s: float
    trainable: int  # trainable parameters
    checkpoint: str

    def lines(self) -> str:
        def show(v):
            if isinstance(v, float):
                return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
            return f"{v:,}" if isinstance(v, int) else str(v)

        return "\n".join(f"  {k:15s} {show(v)}" for k, v in dataclasses.asdict(self).items())


def checkpoints(output_dir: str) -> list[tuple[int, pathlib.Path]]:
    """(epoch, directory) of the complete checkpoints in output_dir, oldest first."""
    out = pathlib.Path(output_dir)
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := EPOCH_DIR.fullmatch(p.name))] if out.is_dir() else []
    return sorted((e, p) for e, p in found if (p / STATE_FILE).is_file())


def schedule(config: TrainConfig, total: int):
    """lr factor at optimizer step s: linear warmup, then cosine / linear decay to 0, or constant."""
    warmup = int(config.warmup_ratio * total)

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        done = (s - warmup) / max(1, total - warmup)
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * done))
        return 1 - done if config.schedule == "linear" else 1.0

    return factor


def step_loss(model, micro: list[dict]) -> tuple[float, int]:
    """Backward for one optimizer step: sum of next-token cross-entropies over the output
    tokens of all micro-batches / their count, so accumulation equals one big batch."""
    count = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
    total = 0.0
    for b in micro:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, [n +] T, V)
        logits = logits[:, logits.shape[1] - b["input_ids"].shape[1]:]  # prompt tuning: drop its n virtual positions
        # position t predicts token t + 1
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(),
                               ignore_index=IGNORE, reduction="sum") / count
        loss.backward()
        total += loss.item()
    return total, count


def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(model, config: TrainConfig, tuner, epoch: int, state: dict) -> pathlib.Path:
    """Write checkpoint epoch_<epoch>/ whole: built and fsynced in a temporary directory
    beside it, then renamed, so output_dir never holds half a checkpoint."""
    out = pathlib.Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"epoch_{epoch}"
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out, prefix=f".epoch_{epoch}.", suffix=".tmp"))
    try:
        save_adapter(model, tmp)  # PEFT's format (bottleneck adapters: lowrank's, same layout)
        (tmp / WORKFLOW_FILE).write_text(json.dumps({"epoch": epoch, "config": config.to_dict()}, indent=2) + "\n")
        torch.save(state, tmp / STATE_FILE)
        for f in (tmp / WORKFLOW_FILE, tmp / STATE_FILE, tmp):
            _fsync(f)
        if final.exists():  # only when a run restarts an epoch it had already finished
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _resume_from(config: TrainConfig, resume: bool):
    """(start epoch, state or None); refuses to overwrite or to resume a different run."""
    found = checkpoints(config.output_dir)
    if not resume:
        if found:
            raise ConfigError(f"output_dir {config.output_dir!r} already holds checkpoints (epoch_{found[-1][0]}); "
                              "pass --resume to continue that run, or choose another output_dir")
        return 0, None
    if not found:
        raise ConfigError(f"--resume: output_dir {config.output_dir!r} holds no complete checkpoint to resume from")
    epoch, path = found[-1]
    saved = json.loads((path / WORKFLOW_FILE).read_text())["config"]
    now = json.loads(json.dumps(config.to_dict()))  # as the checkpoint stored it: tuples are lists
    differ = sorted(k for k, v in now.items() if k not in RESUMABLE and saved.get(k) != v)
    if differ:
        raise ConfigError(f"--resume: the config differs from the one {path} was trained with in {differ}")
    if epoch >= config.epochs:
        raise ConfigError(f"--resume: {path} is already epoch {epoch} of epochs={config.epochs}; nothing to do")
    return epoch, torch.load(path / STATE_FILE, weights_only=True)


def _state(epoch: int, step: int, model, optimizer, scheduler) -> dict:
    """All a resumed run needs to continue as if never stopped."""
    return {"epoch": epoch, "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),  # dropout's; the data order needs none (batches.epoch_batches)
            **({"cuda_rng": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}),
            "trainable": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}}


def _restore(state: dict, model, optimizer, scheduler) -> int:
    """Put a checkpoint's state back; returns its optimizer step."""
    missing, unexpected = load_trainable(model, state["trainable"])
    if missing or unexpected:
        raise ConfigError(f"--resume: checkpoint tensors do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"]


def train(config: TrainConfig, resume: bool = False, stream=None) -> Summary:
    """Run `config` (from its last checkpoint when `resume`); progress goes to `stream` (stderr)."""
    stream = sys.stderr if stream is None else stream
    start_epoch, state = _resume_from(config, resume)
    records = data_mod.load(config.data)  # every record checked before the model is even loaded
    model, tokenizer = load_base(config.model, config.dtype, config.device)
    device = next(model.parameters()).device
    check_template(config.template, tokenizer)
    encoded = encode_all(tokenizer, config.template, records, config.max_length, config.data)
    print(f"data: {len(records)} records, {encoded.tokens} tokens ({encoded.trained} trained), "
          f"{encoded.truncated} truncated to max_length={config.max_length}", file=stream)

    torch.manual_seed(config.seed)
    tuner = apply_method(model, config.method, dict(config.method_options), dict(config.nf4))
    params = [p for p in model.parameters() if p.requires_grad]
    if config.activation_checkpointing:
        # Note: non-reentrant checkpointing needs no input that requires grad (the embeddings
        # are frozen); transformers 5.2x renamed the method, older versions have the first name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    lengths = [len(ids) for ids, _ in encoded.examples]
    per_epoch = math.ceil(math.ceil(len(lengths) / config.batch_size) / config.grad_accum)
    total = per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(config, total))
    step = 0
    if state is not None:
        step = _restore(state, model, optimizer, scheduler)
        print(f"resumed from epoch_{start_epoch} (step {step})", file=stream)

    pad = pad_id(tokenizer)
    progress = Progress(total, stream, config.log_every, start=step)
    model.train()
    seen = trained = 0
    path, last_loss, t0 = None, float("nan"), time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        batches = epoch_batches(lengths, config.batch_size, config.seed, epoch)
        loss_sum = count_sum = 0.0
        for s in range(0, len(batches), config.grad_accum):
            micro = [{k: v.to(device) for k, v in collate(encoded.examples, b, pad).items()}
                     for b in batches[s:s + config.grad_accum]]
            loss, count = step_loss(model, micro)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens = sum(int(b["attention_mask"].sum()) for b in micro)
            seen, trained = seen + tokens, trained + count
            loss_sum, count_sum = loss_sum + loss * count, count_sum + count
            progress.update(epoch + 1, config.epochs, loss, lr, tokens)
        last_loss = loss_sum / max(1, count_sum)
        path = _save(model, config, tuner, epoch + 1, _state(epoch + 1, step, model, optimizer, scheduler))
        progress.note(f"epoch {epoch + 1}/{config.epochs}: mean loss {last_loss:.4f}, saved {path}")
    progress.close()
    seconds = time.perf_counter() - t0
    return Summary(epochs=config.epochs, steps=step, records=len(records), truncated=encoded.truncated, tokens=seen,
                   trained_tokens=trained, loss=last_loss, seconds=seconds, tokens_per_s=seen / max(seconds, 1e-9),
                   trainable=sum(p.numel() for p in params), checkpoint=str(path))
