"""`lowrank train CONFIG`: fine-tune a causal LM on conversations with one lowrank method.

    check config and data -> load base -> (quantize) -> inject -> encode -> for each epoch:
    batches -> loss on output tokens -> AdamW step -> checkpoint epoch_<n>/ -> summary

Every check runs before the first step; a bad config or record is one error. A checkpoint is
a PEFT adapter directory (methods.py) plus `lowrank_workflow.json` (this run's config) and
`trainer_state.pt` (optimizer, schedule, RNG, adapter tensors), written whole or not at all.
With `distributed: ddp | fsdp` every process torchrun starts runs this loop on its share of
each step (parallel.py; See Note: one process's arithmetic on two ranks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import sys
import time

import torch
import torch.nn.functional as F

from ..io import save_adapter
from ..optim import PagedAdamW
from ..shards import _fsync_dir, held_directory, temporary_directory
from . import data as data_mod
from . import parallel
from .batches import collate, encode_all, epoch_batches, pad_id
from .config import ConfigError, TrainConfig
from .methods import load_trainable
from .model import WORKFLOW_FILE, apply_method, check_context, compile_blocks, load_base
from .progress import Progress
from .template import IGNORE, check_template

STATE_FILE = "trainer_state.pt"
EPOCH_DIR = re.compile(r"epoch_(\d+)")
# the temporary directories of a checkpoint being written: _save's own, and the ones save_adapter's
# atomic_directory makes beside it (.<_save's name>.<random>.tmp, and .old where it cannot exchange)
_SAVING = r"\.epoch_\d+\.[a-z0-9_]{8}\.tmp"  # 8 of [a-z0-9_]: temporary_directory's hex, tempfile.mkdtemp's letters
UNFINISHED = re.compile(rf"{_SAVING}|\.{_SAVING}\.[a-z0-9_]{{8}}\.(tmp|old)")
RESUMABLE = ("epochs", "log_every", "output_dir", "device", "compile")  # fields --resume lets differ from the checkpoint's


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
    ranks: int  # processes that trained (distributed: ddp / fsdp under torchrun), else 1

    def lines(self) -> str:
        def show(v):
            if isinstance(v, float):
                return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
            return f"{v:,}" if isinstance(v, int) else str(v)

        return "\n".join(f"  {k:15s} {show(v)}" for k, v in dataclasses.asdict(self).items())


def checkpoints(output_dir: str, complete: bool = True) -> list[tuple[int, pathlib.Path]]:
    """(epoch, directory) of the complete checkpoints in output_dir (with `complete=False`: every
    epoch_<n> directory, a checkpoint whose state file went or not), oldest first."""
    out = pathlib.Path(output_dir)
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := EPOCH_DIR.fullmatch(p.name))] if out.is_dir() else []
    return sorted((e, p) for e, p in found if not complete or (p / STATE_FILE).is_file())


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


def step_loss(model, micro: list[dict], count: int | None = None, weights: list[float] | None = None,
              scale: int = 1, sync=None) -> tuple[float, int]:
    """Backward for one optimizer step: sum of next-token cross-entropies over the output
    tokens of all micro-batches / their count, so accumulation equals one big batch.
    On several ranks `micro` is this rank's share: `count` is the step's output tokens on all
    ranks, `weights` 0 marks a stand-in batch (parallel.shares), `scale` is the number of ranks
    (see Note: one process's arithmetic on two ranks) and `sync(last)` the context of each
    micro-batch (gradients are reduced in the last). Returns (this rank's loss, count)."""
    count = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro) if count is None else count
    weights = [1.0] * len(micro) if weights is None else weights
    total = 0.0
    for i, (b, weight) in enumerate(zip(micro, weights)):
        with sync(i == len(micro) - 1) if sync else contextlib.nullcontext():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, [n +] T, V)
            logits = logits[:, logits.shape[1] - b["input_ids"].shape[1]:]  # prompt tuning: drop its n virtual positions
            # position t predicts token t + 1
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(),
                                   ignore_index=IGNORE, reduction="sum") / count
            (loss * (weight * scale)).backward()  # weight 0 or 1; scale exact when a power of 2 (See Note below)
        total += weight * loss.item()
    return total, count


# Note: one process's arithmetic on two ranks. With W ranks, a global micro-batch of
# batch_size sequences is W per-rank batches of batch_size / W, each length-bucketed on its
# own, and the run is the one-process run with batch_size / W and grad_accum * W: the same
# batches, in the same steps, with the same schedule. Each rank scales its loss by W and
# DDP / FSDP2 average the ranks' gradients. For W a power of 2 the scaling and the averaging
# are exact (a power of 2 commutes with rounding; every backward op is linear in the incoming
# gradient), and with W = 2 and grad_accum 1 the reduction is one addition, g0 + g1, the very
# sum one process accumulates; gradient clipping sees the same norm (See Note: clipping
# sharded gradients, parallel.py). So that run and this one end equal to the bit (tested in
# tests/workflow/test_distributed_train.py). With grad_accum > 1 each rank first sums its own
# micro-batches, another order of the same additions: the same training up to rounding.


def _save(model, config: TrainConfig, tuner, epoch: int, state: dict, ranks: parallel.Ranks) -> pathlib.Path:
    """Write checkpoint epoch_<epoch>/ whole: built and fsynced in a temporary directory
    beside it, then renamed, so output_dir never holds half a checkpoint. Every rank calls
    this; rank 0 writes (docs/distributed.md, rule 3)."""
    out = pathlib.Path(config.output_dir)
    final = out / f"epoch_{epoch}"

    def make_tmp() -> pathlib.Path:
        out.mkdir(parents=True, exist_ok=True)
        return temporary_directory(out, f".epoch_{epoch}.", ".tmp")  # See UNFINISHED

    def finish() -> None:
        (tmp / WORKFLOW_FILE).write_text(json.dumps({"epoch": epoch, "config": config.to_dict()}, indent=2) + "\n")
        torch.save(state, tmp / STATE_FILE)
        for f in (tmp / WORKFLOW_FILE, tmp / STATE_FILE, tmp):
            _fsync_dir(f)
        if final.exists():  # _resume_from refused later epochs: this one appeared during the run
            raise FileExistsError(f"{final} appeared while this run trained epoch {epoch}; it is left as it is and "
                                  "this run's checkpoint of that epoch is not saved")
        os.replace(tmp, final)
        _fsync_dir(out)

    tmp = ranks.first(make_tmp)  # one path for every rank
    try:
        # PEFT's format (bottleneck adapters: lowrank's, same layout). Under FSDP2 a collective that tells
        # every rank of rank 0's failure; otherwise rank 0 alone writes, so its failure must reach the
        # others through ranks.first, or they would wait in finish's broadcast for a rank that raised
        if ranks.mode == "fsdp":
            save_adapter(model, tmp)
            ranks.first(finish)
        else:
            ranks.first(lambda: (save_adapter(model, tmp), finish()))
    except BaseException:
        if ranks.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _resume_from(config: TrainConfig, resume: bool):
    """(start epoch, state or None); refuses to overwrite or to resume a different run."""
    out = pathlib.Path(config.output_dir)
    if any((p.exists() or p.is_symlink()) and not p.is_dir() for p in (out, *out.parents)):  # a link to nothing too
        raise ConfigError(f"output_dir {config.output_dir!r} is not a directory (a file or a broken link is in its "
                          "place or above it)")
    found = checkpoints(config.output_dir)
    if not resume:
        held = checkpoints(config.output_dir, complete=False)  # an adapter whose trainer state went is still one
        if held:
            raise ConfigError(f"output_dir {config.output_dir!r} already holds checkpoints (epoch_{held[-1][0]}); "
                              "pass --resume to continue that run, or choose another output_dir")
        return 0, None
    if not found:
        raise ConfigError(f"--resume: output_dir {config.output_dir!r} holds no complete checkpoint to resume from")
    epoch, path = found[-1]
    # an epoch_<n> after it without a trainer state is an adapter still: resuming would replace it
    later = [p.name for e, p in checkpoints(config.output_dir, complete=False) if e > epoch]
    if later:
        raise ConfigError(f"--resume: output_dir {config.output_dir!r} holds {later} after {path.name}, the last "
                          f"checkpoint with its {STATE_FILE}; resuming from {path.name} would replace them. Move "
                          f"them out of output_dir (or delete them) to resume from {path.name}, or train in a new "
                          "output_dir")
    saved = json.loads((path / WORKFLOW_FILE).read_text())["config"]
    now = json.loads(json.dumps(config.to_dict()))  # as the checkpoint stored it: tuples are lists
    # a field newer than the checkpoint is at its default there (trust_remote_code in a run made before it)
    default = json.loads(json.dumps(TrainConfig(model="m", data="d", output_dir="o").to_dict()))
    differ = sorted(k for k, v in now.items() if k not in RESUMABLE and saved.get(k, default[k]) != v)
    if differ:
        raise ConfigError(f"--resume: the config differs from the one {path} was trained with in {differ}")
    if epoch >= config.epochs:
        raise ConfigError(f"--resume: {path} is already epoch {epoch} of epochs={config.epochs}; nothing to do")
    return epoch, torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")


def _clear_unfinished(config: TrainConfig, ranks: parallel.Ranks, stream) -> None:
    """Remove the temporary directories of checkpoints a killed run was writing (_save builds
    one as .epoch_<n>.<random>.tmp and renames it when whole; see UNFINISHED): no run reads them."""
    out = pathlib.Path(config.output_dir)
    stale = []
    if ranks.main and out.is_dir():
        stale = sorted(p for p in out.iterdir() if UNFINISHED.fullmatch(p.name) and p.is_dir())
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        print("removed the temporary directories of unfinished checkpoints a stopped run left: "
              f"{[p.name for p in stale]}", file=stream)


def _rng() -> dict:
    return {"rng": torch.get_rng_state(),  # dropout's; the data order needs none (batches.epoch_batches)
            **({"cuda_rng": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}


def _state(epoch: int, step: int, model, optimizer, scheduler, ranks: parallel.Ranks) -> dict:
    """All a resumed run needs to continue as if never stopped; tensors whole, whatever the
    sharding (gathering them is a collective: every rank calls this)."""
    return {"epoch": epoch, "step": step, "optimizer": parallel.full_optimizer_state(optimizer),
            "scheduler": scheduler.state_dict(), **_rng(), "world": ranks.world,
            **({"rank_rng": ranks.gather(_rng())} if ranks.mode != "none" else {}),
            "trainable": parallel.full_trainable(model)}


def _restore_trainable(state: dict, model) -> None:
    """The checkpoint's adapter tensors, before DDP / FSDP2 wrap the model."""
    missing, unexpected = load_trainable(model, state["trainable"])
    if missing or unexpected:
        raise ConfigError(f"--resume: checkpoint tensors do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _restore(state: dict, optimizer, scheduler, ranks: parallel.Ranks) -> int:
    """Put the rest of a checkpoint's state back; returns its optimizer step."""
    sd = state["optimizer"]
    optimizer.load_state_dict(parallel.shard_optimizer_state(sd, optimizer) if ranks.mode == "fsdp" else sd)
    scheduler.load_state_dict(state["scheduler"])
    # this run's schedule from the next step on: with `epochs` changed the checkpoint's lr is the old one's
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    rng = state["rank_rng"][ranks.rank] if ranks.mode != "none" else state
    torch.set_rng_state(rng["rng"])
    if "cuda_rng" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda_rng"])
    return state["step"]


class _Quiet:
    """The progress stream of ranks other than 0: only rank 0 reports."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def train(config: TrainConfig, resume: bool = False, stream=None) -> Summary:
    """Run `config` (from its last checkpoint when `resume`); progress goes to `stream` (stderr).
    With distributed: ddp / fsdp, every process torchrun started calls this."""
    ranks = parallel.start(config.distributed, config.device)
    finished = False
    try:
        with contextlib.ExitStack() as held:
            summary = _train(config, resume, (sys.stderr if stream is None else stream) if ranks.main else _Quiet(),
                             ranks, held)
        finished = True
        return summary
    finally:
        parallel.stop(ranks, finished)


def _hold(output_dir: str, held: contextlib.ExitStack) -> str | None:
    """Make this run output_dir's one writer until it ends (shards.held_directory): a second run
    there would clear this one's unfinished checkpoint and write over its epochs. Returns the
    refusal, which every rank raises as a ConfigError (one line each, not rank 0's error wrapped
    in a RuntimeError with its traceback on the others)."""
    try:
        held.enter_context(held_directory(output_dir))
    except BlockingIOError as e:
        return f"output_dir {output_dir!r}: {e.strerror}; wait for that run to end, or choose another output_dir"
    except (FileExistsError, NotADirectoryError):  # a file where output_dir goes: _resume_from refuses it, naming it
        pass
    return None


def _train(config: TrainConfig, resume: bool, stream, ranks: parallel.Ranks, held: contextlib.ExitStack) -> Summary:
    if config.batch_size % ranks.world:
        raise ConfigError(f"batch_size is the global micro-batch, split evenly over the ranks: it must be a multiple "
                          f"of the {ranks.world} ranks; got {config.batch_size}")
    busy = ranks.first(lambda: _hold(config.output_dir, held))  # rank 0 writes; its refusal reaches every rank
    if busy:  # before _resume_from: a running run's epochs are not this one's to resume or refuse
        raise ConfigError(busy)
    start_epoch, state = _resume_from(config, resume)
    if state is not None and state.get("world", 1) != ranks.world:
        raise ConfigError(f"--resume: the checkpoint was trained on {state.get('world', 1)} rank(s), this run has "
                          f"{ranks.world}; the per-rank batches would differ: resume on {state.get('world', 1)}")
    _clear_unfinished(config, ranks, stream)
    records = data_mod.load(config.data)  # every record checked before the model is even loaded
    model, tokenizer = load_base(config.model, config.dtype, ranks.device, config.trust_remote_code)
    device = next(model.parameters()).device
    check_template(config.template, tokenizer)
    encoded = encode_all(tokenizer, config.template, records, config.max_length, config.data)
    print(f"data: {len(records)} records, {encoded.tokens} tokens ({encoded.trained} trained), "
          f"{encoded.truncated} truncated to max_length={config.max_length}", file=stream)

    torch.manual_seed(config.seed)  # the same adapter initialisation on every rank
    tuner = apply_method(model, config.method, dict(config.method_options), dict(config.nf4), config.adapter_dtype)
    check_context(model, max((len(ids) for ids, _ in encoded.examples), default=0), config.max_length)
    if state is not None:
        _restore_trainable(state, model)
    if config.activation_checkpointing:
        # Note: non-reentrant checkpointing needs no input that requires grad (the embeddings
        # are frozen); transformers 5.2x renamed the method, older versions have the first name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.compile:
        n = compile_blocks(model)  # before DDP / fully_shard wrap them (torchtitan's order too)
        print(f"compile: {n} decoder layers torch.compiled; the first steps wait for compilation", file=stream)
    wrapped = parallel.wrap(model, ranks)  # after quantize and inject: docs/distributed.md, rule 1
    params = [p for p in model.parameters() if p.requires_grad]  # under FSDP2, the sharded ones
    if ranks.mode != "none":
        torch.manual_seed(config.seed + 1_000_003 * (ranks.rank + 1))  # each rank its own dropout
    # PagedAdamW(paged=False) is torch.optim.AdamW; paged: the same updates, states in managed memory;
    # optimizer_bits 8: AdamW8bit's update and 8-bit moments (lowrank/optim.py, Note: 8-bit states)
    optimizer = PagedAdamW(params, lr=config.lr, weight_decay=config.weight_decay, paged=config.paged_optimizer,
                           state_bits=config.optimizer_bits)
    lengths = [len(ids) for ids, _ in encoded.examples]
    outputs = [sum(y != IGNORE for y in labels[1:]) for _, labels in encoded.examples]  # trained tokens
    per_rank, per_step = config.batch_size // ranks.world, config.grad_accum * ranks.world  # in batches
    per_epoch = math.ceil(math.ceil(len(lengths) / per_rank) / per_step)  # See Note: one process's arithmetic ...
    total = per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(config, total))
    step = 0
    if state is not None:
        step = _restore(state, optimizer, scheduler, ranks)
        print(f"resumed from epoch_{start_epoch} (step {step})", file=stream)

    pad = pad_id(tokenizer)
    progress = Progress(total, stream, config.log_every, start=step)
    wrapped.train()
    seen = trained = 0
    path, last_loss, t0 = None, float("nan"), time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        batches = epoch_batches(lengths, per_rank, config.seed, epoch)
        loss_sum = count_sum = 0.0
        for s in range(0, len(batches), per_step):
            group = batches[s:s + per_step]  # this step's batches, all ranks
            share = parallel.shares(group, ranks)  # this rank's
            micro = [{k: v.to(device) for k, v in collate(encoded.examples, b, pad).items()} for b, _ in share]
            count = sum(outputs[i] for b in group for i in b)
            loss, _ = step_loss(wrapped, micro, count, [w for _, w in share], ranks.world,
                                lambda last: parallel.sync(wrapped, ranks, last))
            loss = ranks.sum(loss)
            norm = parallel.clip_grad_norm_(params, config.max_grad_norm, ranks) if config.max_grad_norm > 0 else 0.0
            if not math.isfinite(loss) or not math.isfinite(norm):  # every later update and checkpoint would be NaN
                raise FloatingPointError(
                    f"step {step + 1} (epoch {epoch + 1}): the {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                    f"is {loss if not math.isfinite(loss) else norm}; stopped before its update (the checkpoints written "
                    "so far are as they were). A lower lr" + ("" if config.max_grad_norm > 0 else ", max_grad_norm")
                    + " or float32 adapters (adapter_dtype) may help")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens = sum(lengths[i] for b in group for i in b)
            seen, trained = seen + tokens, trained + count
            loss_sum, count_sum = loss_sum + loss * count, count_sum + count
            progress.update(epoch + 1, config.epochs, loss, lr, tokens)
        last_loss = loss_sum / max(1, count_sum)
        path = _save(model, config, tuner, epoch + 1, _state(epoch + 1, step, model, optimizer, scheduler, ranks), ranks)
        progress.note(f"epoch {epoch + 1}/{config.epochs}: mean loss {last_loss:.4f}, saved {path}")
    progress.close()
    seconds = time.perf_counter() - t0
    return Summary(epochs=config.epochs, steps=step, records=len(records), truncated=encoded.truncated, tokens=seen,
                   trained_tokens=trained, loss=last_loss, seconds=seconds, tokens_per_s=seen / max(seconds, 1e-9),
                   trainable=sum(p.numel() for p in params), checkpoint=str(path), ranks=ranks.world)
