"""The Ray-free training loop: loss falls, checkpoints resume where they stopped."""
import pytest
import torch

from raymanifold import checkpoint as ckpt
from raymanifold.config import config_from_dict
from raymanifold.training import batch_stream, train_inprocess
from raymanifold import data as rdata


def _cfg(steps=300, **train):
    return config_from_dict({"family": "diffusion", "name": "inproc", "data": {"n_train": 2000},
                             "model": {"hidden": 64, "eval_points": 200},
                             "train": {"steps": steps, "batch_size": 256, "checkpoint_every": 100,
                                       "log_every": 50, "lr": 2e-3, "num_workers": 1, **train}})


def test_loss_falls_inprocess():
    losses = []
    train_inprocess(_cfg(400, log_every=1), log=lambda step, m: losses.append(m["loss"]))
    assert len(losses) == 400
    first, last = sum(losses[:20]) / 20, sum(losses[-50:]) / 50
    assert last < 0.6 * first, (first, last)


def test_resume_continues_from_saved_step(tmp_path):
    cfg = _cfg(300)
    with pytest.raises(KeyboardInterrupt):
        train_inprocess(cfg, checkpoint_dir=tmp_path, stop_after=150)
    saved = ckpt.load(tmp_path / "checkpoint.pt")
    assert saved["step"] == 100  # last checkpoint before the interruption
    assert saved["config"]["train"]["steps"] == 300  # resolved config stored in the checkpoint
    steps = []
    _, _, info = train_inprocess(cfg, checkpoint_dir=tmp_path, log=lambda s, m: steps.append(s))
    assert info["start_step"] == 100 and info["step"] == 300
    assert steps[0] == 150 and steps[-1] == 300  # logged steps continue, not restart from zero
    assert ckpt.load(tmp_path / "checkpoint.pt")["step"] == 300


def test_batch_stream_shards_are_disjoint_and_cover():
    ds = rdata.ArrayDataset(torch.arange(100).float().unsqueeze(1))
    seen = []
    for rank in range(3):
        it = batch_stream(ds, 11, rank=rank, world_size=3, seed=1)
        seen.append(torch.cat([next(it)[0] for _ in range(3)]).flatten().tolist())
    flat = [v for s in seen for v in s]
    assert len(flat) == len(set(flat)) == 99  # 3 ranks x 3 batches x 11, no overlap in one epoch


def test_checkpoint_loads_with_weights_only(tmp_path):
    cfg = _cfg(1)
    from raymanifold.recipes import get_recipe

    m = get_recipe("diffusion").build(cfg)
    p = ckpt.save(tmp_path / "c.pt", m, cfg, 1, optimizer=torch.optim.Adam(m.parameters()))
    state = torch.load(p, weights_only=True)
    assert state["family"] == "diffusion" and state["step"] == 1


def test_cosine_lr_schedule_values_and_resume(tmp_path):
    """train.lr_schedule cosine: lr at step 1, lr_min at the last step, the mean at the middle; the loop sets it
    every step (logged ``lr``), and a resumed run continues the schedule instead of restarting it."""
    from raymanifold.config import ConfigError
    from raymanifold.training import lr_at

    cfg = _cfg(21, lr_schedule="cosine", lr_min=1e-4, log_every=1, checkpoint_every=10)
    t = cfg.train
    assert lr_at(t, 1) == pytest.approx(2e-3) and lr_at(t, 21) == pytest.approx(1e-4)
    assert lr_at(t, 11) == pytest.approx((2e-3 + 1e-4) / 2)
    assert lr_at(_cfg(21).train, 15) == 2e-3  # constant
    seen = {}
    train_inprocess(cfg, log=lambda s, m: seen.__setitem__(s, m["lr"]))
    assert [seen[s] for s in (1, 11, 21)] == pytest.approx([2e-3, 1.05e-3, 1e-4])
    with pytest.raises(KeyboardInterrupt):
        train_inprocess(cfg, checkpoint_dir=tmp_path, stop_after=15)
    resumed = {}
    train_inprocess(cfg, checkpoint_dir=tmp_path, log=lambda s, m: resumed.__setitem__(s, m["lr"]))
    assert min(resumed) == 11 and resumed[11] == pytest.approx(seen[11])
    with pytest.raises(ConfigError, match="train.lr_min"):
        _cfg(21, lr_schedule="cosine", lr_min=1.0)


def test_progress_line_carries_an_eta_from_the_mean_rate_of_this_attempt():
    from types import SimpleNamespace

    from raymanifold.training import eta_s, format_eta, progress_line

    cfg = SimpleNamespace(name="m", train=SimpleNamespace(steps=1000))
    assert eta_s(200, 300, 1000, 50.0) == pytest.approx(350.0)     # 100 steps in 50 s since the resume at 200
    assert eta_s(300, 300, 1000, 5.0) is None and eta_s(0, 1000, 1000, 9.0) == 0.0
    assert [format_eta(s) for s in (12.4, 355, 3725, None)] == ["ETA 12s", "ETA 5m55s", "ETA 1h02m", ""]
    assert progress_line(cfg, 300, {"loss": 1.5}, eta=355) == "[train m] step 300/1000  loss=1.5  ETA 5m55s"
    assert progress_line(cfg, 300, {"loss": 1.5}) == "[train m] step 300/1000  loss=1.5"


# ----------------------------------------------------------------------------- gradients stay synchronised (DDP)
class _TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)


def _toy_loss(model, batch, cfg, step, generator):
    """Calls the module's parts, never its forward (as DAED's loss does): only a DDP wrapper around the whole
    step (training.StepModule) can synchronise this."""
    net = getattr(model, "module", model)
    out = net.head(torch.tanh(net.body(batch[0]))).pow(2).mean()
    return out, {"loss": float(out.detach())}


def _two_rank_worker(rank, world, port, folder):
    import os
    from types import SimpleNamespace

    import torch.distributed as dist

    from raymanifold.training import StepModule, run_steps

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = _TwoHeads()
    recipe = SimpleNamespace(loss=_toy_loss)
    cfg = SimpleNamespace(train=SimpleNamespace(grad_clip=0.0, lr_schedule="constant"))
    ddp = torch.nn.parallel.DistributedDataParallel(StepModule(model, recipe, cfg))
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(rank + 1))  # each rank its own shard
    run_steps(recipe, ddp, torch.optim.SGD(model.parameters(), lr=0.5), iter([(x,), (x,)]), cfg, start_step=0,
              end_step=2, generator=torch.Generator())
    torch.save(model.state_dict(), f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_around_the_training_step_keeps_the_replicas_equal(tmp_path):
    """Two gloo ranks with different data: after run_steps the weights are equal (the gradients were all-reduced),
    even though the loss never calls the module's forward (the DAED case of issue #26)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0)
    assert not torch.equal(a["head.weight"], _TwoHeads().head.weight.detach())  # and training moved them
