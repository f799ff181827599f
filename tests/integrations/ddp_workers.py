"""Code that runs inside the spawned ranks of the DDP tests (importable by the child processes).

Every case is built from a seed, so the parent process can rebuild the union of the ranks' batches and
compute the single-process reference itself.
"""

from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.distributed as dist
from torch import nn

WORLD = 2
TINY_MLP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_models.py") + ":tiny_mlp"


def run_ranks(fn, *args, world: int = WORLD) -> None:
    """Start ``world`` gloo ranks running ``fn(rank, world, *args)``.

    The ranks meet through a file, not a TCP port: a port found free here could be taken by another
    process before the ranks bind it, which made these tests fail now and then."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        init_method = "file://" + os.path.join(folder, "rendezvous")
        mp.start_processes(_entry, args=(world, init_method, fn, args), nprocs=world, start_method="spawn", join=True)


def _entry(rank: int, world: int, init_method: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----- the probe of the global batch ------------------------------------------------------------------

# name -> (rows per rank, classes, features, kind)
FEATURE_CASES = {
    "reduce_hard_smoothing_ignore": ((7, 4), 5, 16, "hard"),
    "gather_hard": ((4, 3), 10, 64, "hard"),
    "reduce_soft": ((6, 6), 4, 24, "soft"),
    "gather_soft": ((3, 2), 12, 48, "soft"),
    "reduce_pseudo": ((5, 8), 3, 20, "pseudo"),
    "gather_pseudo": ((2, 4), 16, 64, "pseudo"),
    "reduce_bce": ((6, 5), 4, 24, "bce"),
    "reduce_rank1_all_ignored": ((6, 3), 4, 24, "ignored_on_rank1"),
    "reduce_empty_rank1": ((6, 0), 4, 24, "hard"),
    "single_class": ((6, 6), 4, 24, "single"),
}


def feature_case(name: str):
    """The union batch of a case: features, logits, targets and head, plus the rank sizes."""
    sizes, c, d, kind = FEATURE_CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    n = sum(sizes)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(c, generator=g, dtype=torch.float64)
    a = z @ w.T + b
    options = {"loss": "ce", "label_smoothing": 0.0}
    if kind in ("hard", "ignored_on_rank1"):
        t = torch.randint(0, c, (n,), generator=g)
        t[::5] = -100
        if kind == "ignored_on_rank1":
            t[sizes[0]:] = -100
        options["label_smoothing"] = 0.1
    elif kind == "single":
        t = torch.full((n,), 2, dtype=torch.long)
    elif kind == "soft":
        t = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64), 1)
    elif kind == "bce":
        t = (torch.rand(n, c, generator=g) > 0.5).to(torch.float64)
        options["loss"] = "bce"
    else:
        t = "pseudo"
    return sizes, z, a, t, w, b, options


def shard_of(x, sizes, rank):
    if isinstance(x, str):
        return x
    start = sum(sizes[:rank])
    return x[start: start + sizes[rank]]


def probe_cases_worker(rank: int, world: int, out_dir: str) -> None:
    from valfree.errors import ValfreeError
    from valfree.integrations.distributed import distributed_head_gradient, distributed_head_gradient_from_features

    results = {}
    for name in FEATURE_CASES:
        sizes, z, a, t, w, b, options = feature_case(name)
        probe = distributed_head_gradient_from_features(
            shard_of(z, sizes, rank), shard_of(a, sizes, rank), shard_of(t, sizes, rank), w, b, **options
        )
        results[name] = probe.as_dict()
    # A whole model whose head is a 1x1 convolution (a dense head: every location is a sample).
    model, x, y = dense_head_case()
    probe = distributed_head_gradient(model, x[rank::world], y[rank::world])
    results["dense_head_model"] = probe.as_dict()
    labels = torch.tensor([0, 1, 2]) if rank == 0 else torch.tensor([3, 7, 1])
    try:
        distributed_head_gradient_from_features(torch.randn(3, 5), torch.randn(3, 4), labels, torch.randn(4, 5))
        results["bad_label_error"] = ""
    except ValfreeError as exc:
        results["bad_label_error"] = str(exc)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


# name -> (rows per rank, classes, features): the sizes make the first case gather the union and the
# second all-reduce, by the cost rule of the distributed probe.
FOCAL_PSEUDO_CASES = {"focal_pseudo_gather": ((3, 2), 16, 64), "focal_pseudo_reduce": ((40, 30), 3, 4)}


def focal_pseudo_case(name: str):
    """A CenterNet-style heatmap head probed with pseudo-targets: the union batch and the rank sizes."""
    sizes, c, d = FOCAL_PSEUDO_CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    z = torch.randn(sum(sizes), d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(c, generator=g, dtype=torch.float64)
    return sizes, z, z @ w.T + b, w, b


def focal_pseudo_worker(rank: int, world: int, out_dir: str) -> None:
    from valfree.integrations.distributed import distributed_head_gradient_from_features

    results = {}
    for name in FOCAL_PSEUDO_CASES:
        sizes, z, a, w, b = focal_pseudo_case(name)
        try:
            probe = distributed_head_gradient_from_features(shard_of(z, sizes, rank), shard_of(a, sizes, rank),
                                                            "pseudo", w, b, loss="focal")
            results[name] = probe.as_dict()
        except Exception as exc:  # reported to the parent, which compares with the single-process probe
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    torch.save(results, os.path.join(out_dir, f"focal_rank{rank}.pt"))


def dense_head_case():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1)).double()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (5, 4, 4))
    return model, x, y


# ----- a DDP training run with both Monitor modes ------------------------------------------------------

STEPS = 12


def training_case():
    """A small MLP (no BatchNorm, no dropout) and a fixed global training batch, in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 10, generator=g, dtype=torch.float64)
    y = (x[:, :4].argmax(1) + (torch.rand(48, generator=g) < 0.2).long()) % 4
    x_probe = torch.randn(20, 10, generator=g, dtype=torch.float64)
    y_probe = x_probe[:, :4].argmax(1)
    return model, x, y, x_probe, y_probe


def train_with_monitors(model, x, y, x_probe, y_probe, out_dir, rank=0, world=1):
    """Full-batch SGD on (x, y); under DDP each rank trains on its strided share of the batch."""
    import torch.nn.functional as F

    from valfree import Monitor

    xs, ys = x[rank::world], y[rank::world]
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    common = dict(every=2, tail=0.5, ema=2, save_top_k=2, patience=2, min_delta=1e-3, rule="probe", warmup=0)
    fixed = Monitor(model, probe_batch=(x_probe, y_probe), checkpoint_dir=os.path.join(out_dir, "fixed"),
                    results=os.path.join(out_dir, "fixed.csv"), **common)
    piggy = Monitor(model, piggyback=True, checkpoint_dir=os.path.join(out_dir, "piggy"),
                    results=os.path.join(out_dir, "piggy.csv"), **common)
    log = []
    for step in range(1, STEPS + 1):
        loss = F.cross_entropy(net(xs), ys)
        loss.backward()
        p = piggy.step(step, targets=ys)  # before the optimizer step: the weights that made the logits
        opt.step()
        opt.zero_grad()
        f = fixed.step(step)
        if f is not None:
            log.append({
                "step": step,
                "fixed": f.as_dict(), "piggy": p.as_dict(),
                "fixed_stop": fixed.should_stop(), "piggy_stop": piggy.should_stop(),
                "fixed_best": fixed.best().step, "piggy_best": piggy.best().step,
                "fixed_kept": [os.path.basename(q) for q in fixed.tracker.kept_paths],
                "piggy_kept": [os.path.basename(q) for q in piggy.tracker.kept_paths],
            })
    piggy.close()
    return log


def ddp_training_worker(rank: int, world: int, out_dir: str) -> None:
    model, x, y, x_probe, y_probe = training_case()
    rank_dir = os.path.join(out_dir, f"rank{rank}")
    os.makedirs(rank_dir, exist_ok=True)
    # Checkpoints and results go to one shared folder; only rank 0 writes them.
    log = train_with_monitors(model, x, y, x_probe, y_probe, out_dir, rank, world)
    torch.save(log, os.path.join(rank_dir, "log.pt"))


# ----- `valfree score` split across ranks, through the helper that the CLI uses ------------------------


def all_scenarios_worker(rank: int, world: int, out_dir: str, folder: str, data: str) -> None:
    """Every DDP scenario in one pair of processes: starting ranks costs seconds, the scenarios do not."""
    probe_cases_worker(rank, world, out_dir)
    ddp_training_worker(rank, world, os.path.join(out_dir, "ddp"))
    dist.barrier()
    rule_worker(rank, world, os.path.join(out_dir, "rule"))
    dist.barrier()
    scoring_worker(rank, world, folder, data, os.path.join(out_dir, "split.csv"))
    dist.barrier()
    lightning_worker(rank, world, os.path.join(out_dir, "lightning"))


def lightning_worker(rank: int, world: int, out_dir: str) -> None:
    """Lightning's DDP strategy in processes started outside it, as under torchrun: with LOCAL_RANK set,
    Lightning launches nothing and joins the process group that is already there."""
    import lightning.pytorch as pl

    import valfree

    from .lightning_models import Classifier, ReportState
    from .test_lightning import NOISE, loader
    from .test_monitor import blobs

    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", RANK=str(rank), WORLD_SIZE=str(world))
    os.makedirs(out_dir, exist_ok=True)
    probe = blobs(64, seed=7, noise=NOISE)
    callbacks = [
        valfree.lightning.LabelFreeCheckpoint(probe, dirpath=os.path.join(out_dir, "ckpt"), every_n_train_steps=2,
                                              save_top_k=2, tail=0.5, rule="probe", load_best_at_end=False),
        valfree.lightning.LabelFreeEarlyStopping(probe, every_n_train_steps=2, patience=2, min_delta=0.02,
                                                 rule="probe", warmup=0),
        ReportState(out_dir),
    ]
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy="ddp", callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, max_steps=200, deterministic=True)
    trainer.fit(Classifier(), train_dataloaders=loader())


def run_rule(out_dir: str | None = None, group_size: int = 1):
    """The scripted memorising run under a zero-argument Monitor with the default rule; the fixed data
    is a seeded draw of the training set, which each rank shards. Returns the per-check log."""
    from torch.utils.data import TensorDataset

    from valfree import Monitor

    from .scripted import CHECKS, OneHotClassifier, make_run

    x, y, weights = make_run()
    model = OneHotClassifier()
    monitor = Monitor(model, every=1, total_steps=CHECKS, patience=10, train_data=TensorDataset(x, y),
                      checkpoint_dir=out_dir)
    log = []
    for step in range(1, CHECKS + 1):
        model.set_check(weights, step)
        monitor.step(step)
        log.append({"step": step, **monitor.last_columns, "grad_norm": monitor.last.grad_norm,
                    "stop": monitor.should_stop(), "best": monitor.best().step})
        if monitor.should_stop():
            break
    return log


def rule_worker(rank: int, world: int, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    torch.save(run_rule(out_dir), os.path.join(out_dir, f"rank{rank}.pt"))


def scoring_worker(rank: int, world: int, folder: str, data: str, out: str) -> None:
    from valfree.commands.score_torchrun import torchrun_scoring
    from valfree.io.checkpoints import discover_checkpoints
    from valfree.commands.score import score_checkpoints

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    with torchrun_scoring(out) as run:
        refs, _ = discover_checkpoints(folder)
        score_checkpoints(folder, TINY_MLP, data, out=run.part, refs=run.share(refs),
                          batch_size=32, progress=False)
