"""Distributed training: global pooling, DDP and FSDP2 under torchrun (2 processes, gloo, CPU).

The runs launch ``tests/_distributed_worker.py`` (a minimal trainer that follows the recipe in
:mod:`torchhyper.distributed`) with ``torchrun --standalone --nproc_per_node=2``, and compare
what the ranks write. The first tests need no process group.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from torchhyper import HyperNetwork
from torchhyper.distributed import (
    GlobalMax,
    GlobalMean,
    GlobalSum,
    Process,
    full_state_dict,
    load_full_state_dict,
    setup,
    wrap,
)
from torchhyper.pooling import MaxPool, Pool

WORKER = Path(__file__).with_name("_distributed_worker.py")
# Enough for the worker to learn; the checkpoint every 3 steps lands before the kill at step 5.
RUN = ["--steps=10", "--checkpoint-every=3"]

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)


def launch(
    out: Path, *args: str, nproc: int | None = 2, restarts: int = 0
) -> subprocess.CompletedProcess:
    """Runs the worker under torchrun with ``nproc`` processes, or as plain python with None."""
    if nproc is None:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", f"--max-restarts={restarts}", str(WORKER),
        ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [*cmd, f"--out={out}", *args], capture_output=True, text=True, timeout=180, env=env
    )


def ok(run: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert run.returncode == 0, (
        f"run failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    )
    return run


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """One process on the whole global batch: the reference."""
    out = tmp_path_factory.mktemp("one")
    ok(launch(out, *RUN, "--check-pools", nproc=None))
    return out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    ok(launch(out, *RUN, "--check-pools", "--strategy=ddp", "--pool=global"))
    return out


# Without a process group.


@pytest.mark.parametrize(
    ("pool", "local"),
    [
        (GlobalMean, lambda e: e.mean(0)),
        (GlobalSum, lambda e: e.sum(0)),
        (GlobalMax, lambda e: e.amax(0)),
    ],
)
def test_global_pools_are_local_without_a_process_group(pool, local):
    e = torch.randn(7, 5, requires_grad=True)
    module = pool()
    torch.testing.assert_close(module(e), local(e), rtol=0, atol=0)
    module(e).sum().backward()
    assert e.grad is not None and e.grad.abs().sum() > 0
    sets = torch.randn(3, 7, 5)  # (S, B, H), directly and mapped over the sets
    expected = torch.stack([local(s) for s in sets])
    torch.testing.assert_close(module(sets), expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.vmap(module)(sets), expected, rtol=0, atol=0)
    torch.testing.assert_close(module.local(sets), expected, rtol=0, atol=0)


def test_global_pool_in_hypernetwork_is_registered_and_matches_local_mean():
    downstream = nn.Linear(3, 2)
    x = torch.randn(6, 4)
    torch.manual_seed(1)
    plain = HyperNetwork(4, [8], downstream)
    torch.manual_seed(1)
    pooled = HyperNetwork(4, [8], downstream, pool=GlobalMean())
    assert isinstance(pooled.pool, GlobalMean) and "pool" in dict(pooled.named_children())
    assert list(pooled.state_dict()) == list(plain.state_dict())  # checkpoints interchange
    for name, value in plain(x).items():
        torch.testing.assert_close(pooled(x)[name], value, rtol=0, atol=0)


def test_global_pool_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"GlobalMean expects encodings \(\*, B, H\), got \(5,\)"):
        GlobalMean()(torch.randn(5))
    with pytest.raises(ValueError, match=r"GlobalMax expects encodings \(\*, B, H\), got list"):
        GlobalMax()([1.0, 2.0])
    with pytest.raises(ValueError, match=r"with H == 4, got \(3, 5\)"):
        GlobalSum(4)(torch.randn(3, 5))
    assert isinstance(GlobalMean(), Pool) and isinstance(GlobalMax(), MaxPool)


def test_setup_without_torchrun_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    process = setup(device="cpu")
    assert process == Process(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert process.is_main and not process.distributed
    assert not dist.is_initialized()


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_setup_rejects_cuda_without_cuda():
    with pytest.raises(
        ValueError, match="device is cuda but CUDA is not available; use device='cpu'"
    ):
        setup(device="cuda")


def test_wrap_checks_its_options_and_is_identity_without_process_group():
    hypernetwork = HyperNetwork(4, [8], nn.Linear(3, 2))
    with pytest.raises(ValueError, match="strategy must be 'ddp', 'fsdp2' or 'none', got 'zero'"):
        wrap(hypernetwork, strategy="zero")
    with pytest.raises(
        ValueError, match=r"shard must name submodules of the hypernetwork: unknown \['decoder'\]"
    ):
        wrap(hypernetwork, strategy="fsdp2", shard=["head", "decoder"])
    assert wrap(hypernetwork, strategy="ddp") is hypernetwork
    assert wrap(hypernetwork, strategy="fsdp2") is hypernetwork


def test_full_state_dict_round_trip_without_process_group():
    make = lambda: HyperNetwork(4, [8], nn.Linear(3, 2))  # noqa: E731
    source, target = make(), make()
    optimizer = torch.optim.Adam(source.parameters(), lr=0.1)
    sum(v.sum() for v in source(torch.randn(5, 4)).values()).backward()  # every parameter steps
    optimizer.step()
    state = full_state_dict(source, optimizer)
    assert set(state) == {"model", "optimizer"} and "gain" in state["model"]
    target_optimizer = torch.optim.Adam(target.parameters(), lr=0.1)
    load_full_state_dict(target, state, target_optimizer)
    assert max_diff(source.state_dict(), target.state_dict()) == 0
    assert target_optimizer.state_dict()["state"][0]["step"] == 1
    with pytest.raises(ValueError, match=r"missing keys \['optimizer'\], got keys \['model'\]"):
        load_full_state_dict(target, {"model": state["model"]}, target_optimizer)


# Two processes under torchrun.


@needs_gloo
def test_ddp_parameters_equal_across_ranks(ddp):
    rank0, rank1 = load(ddp / "rank0.pt"), load(ddp / "rank1.pt")
    assert max_diff(rank0["local"], rank1["local"]) == 0
    assert rank0["losses"] == rank1["losses"]


@needs_gloo
def test_ddp_with_global_pool_equals_one_process(ddp, one):
    # The same global batch per step, split in 2 shares of 8: equal to 1e-6 after 10 Adam steps.
    assert max_diff(load(ddp / "final.pt"), load(one / "final.pt")) <= 1e-6
    ddp_losses, one_losses = load(ddp / "rank0.pt")["losses"], load(one / "rank0.pt")["losses"]
    assert len(ddp_losses) == 10
    torch.testing.assert_close(
        torch.tensor(ddp_losses), torch.tensor(one_losses), rtol=1e-6, atol=1e-6
    )


@needs_gloo
def test_global_sum_max_and_per_set_gradients_equal_one_process_and_local_mean_does_not(ddp, one):
    distributed, single = load(ddp / "pool_grads.pt"), load(one / "pool_grads.pt")
    for pool in ("global-sum", "global-max", "per-set"):
        for name, grad in single[pool].items():
            torch.testing.assert_close(
                distributed[pool][name], grad, rtol=1e-5, atol=1e-6, msg=f"{pool} {name}"
            )
    # Pooling each rank's half on its own is a different model: the check can tell them apart.
    assert max_diff(distributed["mean"], single["mean"]) > 1e-3


@needs_gloo
def test_fsdp2_shards_parameters_and_matches_ddp(tmp_path, ddp):
    ok(launch(tmp_path, *RUN, "--strategy=fsdp2", "--pool=global"))
    rank0, rank1 = load(tmp_path / "rank0.pt"), load(tmp_path / "rank1.pt")
    for name, shape in rank0["shapes"].items():
        rows = [rank0["local"][name].shape[0], rank1["local"][name].shape[0]]
        assert rows == [math.ceil(shape[0] / 2), shape[0] - math.ceil(shape[0] / 2)], name
        assert rank0["local"][name].shape[1:] == shape[1:], name
    sizes = {
        name: sum(r["local"][name].numel() for r in (rank0, rank1)) for name in rank0["shapes"]
    }
    assert sizes == {name: math.prod(shape) for name, shape in rank0["shapes"].items()}
    ddp_losses = load(ddp / "rank0.pt")["losses"]
    torch.testing.assert_close(
        torch.tensor(rank0["losses"]), torch.tensor(ddp_losses), rtol=1e-6, atol=1e-6
    )
    assert max_diff(load(tmp_path / "final.pt"), load(ddp / "final.pt")) <= 1e-6


@needs_gloo
def test_killed_rank_stops_the_run_then_it_resumes_by_hand_and_with_max_restarts(tmp_path, ddp):
    failed = launch(tmp_path, *RUN, "--kill-rank=1", "--kill-at=5")
    assert failed.returncode != 0
    # torchrun names the rank that died; the survivor says where training stopped and what to do.
    assert "Signal 9 (SIGKILL) received" in failed.stderr
    assert "rank 0/2: training stopped at step 5" in failed.stderr
    assert f"Last checkpoint: {tmp_path / 'checkpoint.pt'} (after step 3)" in failed.stderr
    assert "Run the same command again to resume" in failed.stderr
    assert not (tmp_path / "final.pt").exists()
    assert load(tmp_path / "checkpoint.pt")["step"] == 3

    # Again by hand, now with --max-restarts=1: it resumes at step 3, rank 1 dies at step 8,
    # torchrun restarts both ranks, they resume at step 6 and finish.
    resumed = ok(launch(tmp_path, *RUN, "--kill-rank=1", "--kill-at=8", restarts=1))
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    assert "at step 6" in resumed.stdout
    final, uninterrupted = load(tmp_path / "final.pt"), load(ddp / "final.pt")
    assert all(torch.equal(final[k], uninterrupted[k]) for k in uninterrupted)


# The experiments' trainer, unchanged, under torchrun.

ROOT = Path(__file__).resolve().parents[1]
GMM = [
    "gmm",  # a registered run of experiments/tasks/gmm.py
    "--steps=4",
    "--batch_size=64",
    "--task.n_train=64",
    "--task.mc_samples=500",
    "--checkpoint_every=2",
    "--global_pool=true",
]


@needs_gloo
def test_experiments_trainer_under_torchrun_equals_one_process(tmp_path):
    # FSDP2, the path with the most trainer code (DDP runs the same code minus the unsharded
    # copy for evaluation; the library's DDP is tested above).
    strategy = "fsdp2"
    sys.path.insert(0, str(ROOT))
    from experiments import train as trainer

    one = trainer.main([*GMM, f"--out_dir={tmp_path / 'one'}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = [*GMM, f"--out_dir={tmp_path / 'two'}", f"--distributed={strategy}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    ok(subprocess.run([*cmd, "-m", "experiments.train", *args], cwd=ROOT, env=env,
                      capture_output=True, text=True, timeout=180))  # fmt: skip

    # Rank 0 alone wrote the run folder: one config, checkpoint, plot and metrics file.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "checkpoint.pt", "config.json", "gmm.png", "metrics.json",
    ]  # fmt: skip
    single, double = (
        load(tmp_path / "one" / "checkpoint.pt"),
        load(tmp_path / "two" / "checkpoint.pt"),
    )
    # Global pooling over 2 shares of each set of 64: the same hypernetwork as on 1 process.
    assert max_diff(double["models"]["hypernetwork"], single["models"]["hypernetwork"]) <= 1e-6
    assert max_diff(double["models"]["direct"], single["models"]["direct"]) == 0  # rank 0's
    torch.testing.assert_close(
        torch.tensor(double["history"]["hypernetwork"]),
        torch.tensor(single["history"]["hypernetwork"]),
        rtol=1e-6,
        atol=1e-6,
    )
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["kl_direct"] == one["kl_direct"]
    assert abs(metrics["kl_hypernetwork"] - one["kl_hypernetwork"]) <= 1e-5
