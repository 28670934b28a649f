"""The training step and loop, free of Ray.

The same :func:`run_steps` drives both the in-process loop (unit tests,
benchmarks' baseline) and each Ray Train worker (:mod:`raymanifold.distributed.train`);
only the batch stream, the model wrapper (DDP) and the reporting hook differ.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from raymanifold import checkpoint as ckpt
from raymanifold import data as rdata
from raymanifold.recipes import get_recipe


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def train_threads(cfg) -> int:
    """Torch intra-op threads of a training process: the Ray Train worker's CPU share,
    ``max(1, int(ray.cpus_per_worker))``, used by Ray Train workers, Tune trials and the in-process loop alike.

    CPU kernels (convolutions, matrix products) split their reductions by thread, so another thread count
    rounds differently; over thousands of steps a clustering run then lands elsewhere (measured on
    GridVAE two-digit, docs/recognition.md "Reproducibility"). One rule everywhere makes a config and seed
    give the same weights in-process, alone on Ray Train and two at a time under Ray Tune.
    """
    return max(1, int(cfg.ray.cpus_per_worker))


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``torch.set_num_threads(n)``; the previous setting is restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def batch_stream(dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device="cpu", start_epoch: int = 0) -> Iterator[tuple]:
    """Endless shuffled batches of this worker's shard.

    The permutation of each epoch is the same on every worker (seeded by
    ``seed`` and the epoch); worker ``rank`` takes every ``world_size``-th
    example of it, so shards are disjoint and cover the data. In-memory data
    sets (:class:`~raymanifold.data.ArrayDataset`) are indexed directly;
    others go through a DataLoader.
    """
    n = len(dataset)
    if n < world_size:
        raise rdata.DataError(f"data: {n} examples cannot be sharded over {world_size} workers")
    epoch = start_epoch
    tensors = getattr(dataset, "tensors", None)
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=g)[rank::world_size]
        for i in range(0, len(perm) - batch_size + 1 if len(perm) >= batch_size else 1, batch_size):
            idx = perm[i:i + batch_size]
            if tensors is not None:
                yield tuple(t[idx].to(device, non_blocking=True) for t in tensors)
            else:
                items = [dataset[int(j)] for j in idx]
                yield tuple(torch.stack([it[k] for it in items]).to(device) for k in range(len(items[0])))
        epoch += 1


class EMA:
    """Exponential moving average of a model's parameters (decay in (0, 1))."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(getattr(model, "module", model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        src = getattr(model, "module", model)
        for e, p in zip(self.module.parameters(), src.parameters()):
            e.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)
        for e, b in zip(self.module.buffers(), src.buffers()):
            e.copy_(b)


def make_optimizer(model, tcfg) -> torch.optim.Optimizer:
    """``train.optimizer`` over the model's trainable parameters: AdamW, or SGD with ``train.momentum``.

    A model may define ``optimizer_groups()`` (a list of torch parameter groups); a group marked
    ``fixed_lr: True`` keeps ``train.lr`` when ``train.lr_schedule`` changes the others (:func:`run_steps`)."""
    groups = model.optimizer_groups() if callable(getattr(model, "optimizer_groups", None)) else \
        [p for p in model.parameters() if p.requires_grad]
    if tcfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    return torch.optim.AdamW(groups, lr=tcfg.lr, weight_decay=tcfg.weight_decay)


def eta_s(start_step: int, step: int, total: int, elapsed_s: float) -> Optional[float]:
    """Seconds left at the mean rate since this attempt started: (total - step) * elapsed / (step - start_step);
    None before the first step of the attempt."""
    done = step - start_step
    if done <= 0 or elapsed_s <= 0:
        return None
    return max(total - step, 0) * elapsed_s / done


def format_eta(seconds: Optional[float]) -> str:
    """``ETA 5m55s`` / ``ETA 1h02m`` / ``ETA 12s``; empty for None."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    s = int(round(seconds))
    if s >= 3600:
        return f"ETA {s // 3600}h{s % 3600 // 60:02d}m"
    return f"ETA {s // 60}m{s % 60:02d}s" if s >= 60 else f"ETA {s}s"


def progress_line(cfg, step: int, metrics: dict, *, eta: Optional[float] = None) -> str:
    """The progress line of a training run, the same on Ray Train and in-process:
    ``[train <name>] step s/N  loss=..., steps_per_s=...  ETA 5m55s`` (``eta``: seconds left, :func:`eta_s`)."""
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
    tail = format_eta(eta)
    return f"[train {cfg.name}] step {step}/{cfg.train.steps}  {shown}" + (f"  {tail}" if tail else "")


def lr_at(tcfg, step: int) -> float:
    """Learning rate of optimizer step ``step`` (1-based) under ``train.lr_schedule``: ``lr``, or the cosine
    lr_min + (lr - lr_min) (1 + cos(pi (step - 1) / (steps - 1))) / 2, which is lr at step 1 and lr_min at the
    last step."""
    if tcfg.lr_schedule == "constant" or tcfg.steps <= 1:
        return tcfg.lr
    t = min(max(step - 1, 0), tcfg.steps - 1) / (tcfg.steps - 1)
    return tcfg.lr_min + (tcfg.lr - tcfg.lr_min) * 0.5 * (1.0 + math.cos(math.pi * t))


class StepModule(torch.nn.Module):
    """One training step's forward: ``recipe.loss(module, batch, cfg, step, generator)``.

    Ray Train wraps THIS module in DistributedDataParallel when it runs more than one worker
    (:mod:`raymanifold.distributed.train`), so every call that a recipe's loss makes into the model runs inside
    DDP's forward and the replicas' gradients are all-reduced for every family, whatever the loss calls (a loss that
    called methods of an unwrapped module, as DAED's did, left the replicas unsynchronised). ``recipe.loss`` always
    receives the plain family module. The parameters are the module's, in the same order."""

    def __init__(self, module: torch.nn.Module, recipe, cfg):
        super().__init__()
        self.module = module
        self.recipe, self.cfg = recipe, cfg

    def forward(self, batch, step: int, generator):
        return self.recipe.loss(self.module, batch, self.cfg, step, generator)


def step_module(model, recipe, cfg) -> torch.nn.Module:
    """``model`` when it already is a (DDP-wrapped) :class:`StepModule`, else a StepModule around it."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return model if isinstance(inner, StepModule) else StepModule(model, recipe, cfg)


def plain_module(model) -> torch.nn.Module:
    """The family's module inside a (DDP-wrapped) :class:`StepModule`."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.module if isinstance(model, StepModule) else model


def run_steps(recipe, model, optimizer, batches: Iterator, cfg, *, start_step: int, end_step: int,
              generator: torch.Generator, ema: Optional[EMA] = None,
              on_step: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Run optimizer steps ``start_step+1 .. end_step``; returns the last step's metrics.

    ``model``: the family's module, or a :class:`StepModule` around it (wrapped in DDP on several workers);
    ``recipe.loss`` receives the plain module and the 1-based number of the step being taken (its
    schedules, e.g. GridVAE's KL warm-up, read it; resumption continues them).
    ``on_step(step, metrics)`` is called after every step and may checkpoint,
    log or raise.
    """
    stepper = step_module(model, recipe, cfg)
    plain = plain_module(stepper)
    stepper.train()
    metrics: dict = {}
    for step in range(start_step + 1, end_step + 1):
        batch = next(batches)
        loss, metrics = stepper(batch, step, generator)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training diverged: loss is {float(loss)} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.train.grad_clip))
        if cfg.train.lr_schedule != "constant":
            lr = lr_at(cfg.train, step)
            for group in optimizer.param_groups:
                if not group.get("fixed_lr"):
                    group["lr"] = lr
            metrics["lr"] = lr
        optimizer.step()
        if ema is not None:
            ema.update(plain)
        if on_step is not None:
            on_step(step, metrics)
    return metrics


def latest_checkpoint(folder) -> Optional[Path]:
    p = Path(folder) / ckpt.FILENAME
    return p if p.is_file() else None


def train_inprocess(cfg, *, checkpoint_dir=None, log: Optional[Callable[[int, dict], None]] = None,
                    stop_after: Optional[int] = None):
    """Train ``cfg`` in this process (no Ray); resume from ``checkpoint_dir`` if it holds a checkpoint.

    Checkpoints every ``train.checkpoint_every`` steps to
    ``checkpoint_dir/checkpoint.pt``. ``stop_after`` interrupts (raises
    KeyboardInterrupt) after that many steps of this call, to test resumption.
    Returns ``(model, ema_or_None, info)`` with ``info = {"start_step", "step", "metrics", "steps_per_s"}``.
    Runs with :func:`train_threads` torch threads (as a Ray Train worker of the same config), so the
    weights equal those of the same config and seed on Ray Train.
    """
    with torch_threads(train_threads(cfg)):
        return _train_inprocess(cfg, checkpoint_dir=checkpoint_dir, log=log, stop_after=stop_after)


def _train_inprocess(cfg, *, checkpoint_dir, log, stop_after):
    recipe = get_recipe(cfg.family)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = recipe.build(cfg).to(device)
    optimizer = make_optimizer(model, cfg.train)
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    start = 0
    if checkpoint_dir is not None and (found := latest_checkpoint(checkpoint_dir)):
        state = ckpt.load(found)
        model.load_state_dict(state["model"])
        if state.get("optimizer"):
            optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema"):
            ema.module.load_state_dict(state["ema"])
        start = state["step"]
    dataset = rdata.load_split(cfg.data, "train")
    bs = cfg.train.batch_size
    per_epoch = max(1, len(dataset) // bs)
    batches = batch_stream(dataset, bs, seed=cfg.train.seed, device=device, start_epoch=start // per_epoch)
    gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + start)
    t0 = time.perf_counter()
    done = {"n": 0}

    def on_step(step, metrics):
        done["n"] += 1
        if log is not None and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
            log(step, metrics)
        if checkpoint_dir is not None and (step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps):
            ckpt.save(Path(checkpoint_dir) / ckpt.FILENAME, model, cfg, step, optimizer=optimizer, ema=ema.module if ema else None,
                      metrics=metrics)
        if stop_after is not None and done["n"] >= stop_after:
            raise KeyboardInterrupt(f"stopped after step {step}")

    metrics = run_steps(recipe, model, optimizer, batches, cfg, start_step=start, end_step=cfg.train.steps,
                        generator=gen, ema=ema, on_step=on_step)
    elapsed = time.perf_counter() - t0
    n = cfg.train.steps - start
    return model, ema, {"start_step": start, "step": cfg.train.steps, "metrics": metrics,
                        "steps_per_s": n / elapsed if elapsed > 0 and n else math.nan}
