"""Faults in the experiments' trainer (issue 13): nothing on disk is lost or mixed up.

A run folder is claimed only once its run has started; a run that stopped before its first
checkpoint starts over (by hand, with --resume, or when torchrun restarts it); a checkpoint
belongs to one run; a full disk leaves the previous checkpoint intact and no temporary file.
Run folders and checkpoints are compared before and after, byte for byte.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import train as trainer  # noqa: E402
from experiments.config import load_run  # noqa: E402
from torchhyper import HyperNetwork  # noqa: E402

GMM = [
    "--steps=4",
    "--batch_size=64",
    "--task.n_train=64",
    "--task.mc_samples=500",
    "--checkpoint_every=2",
]


def run(out: Path, *extra: str) -> dict:
    return trainer.main(["gmm", f"--out_dir={out}", *GMM, *extra])


def files(out: Path) -> dict[str, bytes]:
    """Every file of a run folder, by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())} if out.exists() else {}


def models(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)["models"]


def assert_same_models(a: Path, b: Path) -> None:
    left, right = models(a), models(b)
    for part in ("hypernetwork", "direct"):
        assert list(left[part]) == list(right[part])
        for key, value in left[part].items():
            assert torch.equal(value, right[part][key]), f"{part}.{key} differs"


def crash_at(monkeypatch, call: int) -> None:
    """Makes the ``call``-th training step raise ``KeyboardInterrupt`` (a Ctrl-C)."""
    step, calls = trainer.train_step, {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", crashing)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run, the reference for every recovered one."""
    out = tmp_path_factory.mktemp("straight") / "run"
    torch.set_num_threads(1)  # as the tests run (conftest), for bitwise comparisons
    return out, run(out)


# Config validation, before the run folder ---------------------------------------------------


def test_unknown_head_options_are_refused_at_config_validation(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(
        ValueError,
        match=r"config.head_options has unknown keys \['rnk'\] for head 'lora'; its options "
        r"are \['rank'\]",
    ):
        run(out, "--head=lora", '--head_options={"rnk": 4}')
    assert not out.exists()
    with pytest.raises(ValueError, match=r"unknown keys \['rank'\] for head 'dense'; its options"):
        load_run("gmm", ["--head=dense", '--head_options={"rank": 4}'])
    assert load_run("gmm", ["--head=chunked", '--head_options={"chunk_size": 64}']).head_options


# A run folder is claimed once the run has started -------------------------------------------


def test_a_run_failing_at_start_up_leaves_nothing_behind(tmp_path, monkeypatch, straight):
    out = tmp_path / "run"

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory while building")

    monkeypatch.setattr(trainer, "build_models", broken)
    with pytest.raises(RuntimeError, match="out of memory while building"):
        run(out)
    assert not out.exists()  # a fresh run may take it

    monkeypatch.undo()
    run(out)
    before = files(out)
    monkeypatch.setattr(trainer, "build_models", broken)
    with pytest.raises(RuntimeError, match="out of memory while building"):
        run(out, "--resume=true")
    assert files(out) == before  # a resumed run that fails at start-up changes nothing either


def test_a_run_stopped_before_its_first_checkpoint_starts_over(tmp_path, monkeypatch, straight):
    out = tmp_path / "run"
    crash_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run(out)
    assert sorted(files(out)) == ["config.json"]  # started, no checkpoint yet
    monkeypatch.undo()

    # Another config is refused: the folder records another run.
    with pytest.raises(
        FileExistsError,
        match=r"already exists and is not empty \(it holds only the config.json of a run that "
        r"stopped before its first checkpoint, with another config: differs in \['lr'\]\)",
    ):
        run(out, "--lr=0.5")
    assert sorted(files(out)) == ["config.json"]

    # The same command takes it over, and so does --resume=true: from step 0.
    for extra in ([], ["--resume=true"]):
        crash_at(monkeypatch, 1)
        with pytest.raises(KeyboardInterrupt):
            run(out, *extra)
        monkeypatch.undo()
        assert sorted(files(out)) == ["config.json"]
    metrics = run(out, "--resume=true")
    assert metrics == straight[1]
    assert_same_models(out, straight[0])


def _stop_in_first_checkpoint_write(monkeypatch, out: Path) -> None:
    # As a SIGKILL in the middle of writing: half a temporary file, nothing renamed.
    def killed(path, checkpoint):
        Path(str(path) + ".tmp").write_bytes(b"half a checkpoint")
        raise SystemExit(-9)

    monkeypatch.setattr(trainer, "save_checkpoint", killed)


def _stop_in_evaluation(monkeypatch, out: Path) -> None:
    from experiments.tasks.gmm import GMMTask

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(GMMTask, "finish", killed)


def _stop_in_start_up(monkeypatch, out: Path) -> None:
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "build_task", killed)


MOMENTS = {
    "start-up": _stop_in_start_up,
    "first step": lambda monkeypatch, out: crash_at(monkeypatch, 1),
    "first checkpoint write": _stop_in_first_checkpoint_write,
    "after the first checkpoint": lambda monkeypatch, out: crash_at(monkeypatch, 3),
    "evaluation": _stop_in_evaluation,
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_torchrun_restart_recovers_at_any_moment(tmp_path, monkeypatch, straight, moment):
    # What torchrun --max-restarts does: the same command again, with the restart count set.
    out = tmp_path / "run"
    MOMENTS[moment](monkeypatch, out)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run(out)
    monkeypatch.undo()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    metrics = run(out)
    assert metrics == straight[1]
    assert_same_models(out, straight[0])
    assert sorted(files(out)) == ["checkpoint.pt", "config.json", "gmm.png", "metrics.json"]


needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"
)

# The trainer, made to crash at a given step of its first two attempts.
CRASHING = """
import os, sys
sys.path.insert(0, {root!r})
from experiments import train as trainer

crash = {{"0": 1, "1": 3}}.get(os.environ["TORCHELASTIC_RESTART_COUNT"])  # attempt -> step
step, calls = trainer.train_step, [0]

def crashing(*args, **kwargs):
    calls[0] += 1
    if calls[0] == crash:
        os._exit(1)  # as a crash: no cleanup, no exception handling
    return step(*args, **kwargs)

trainer.train_step = crashing
trainer.main(sys.argv[1:])
sys.stdout.flush()
os._exit(0)
"""


@needs_gloo
def test_torchrun_max_restarts_recovers_before_and_after_the_first_checkpoint(tmp_path, straight):
    script = tmp_path / "crashing.py"
    script.write_text(CRASHING.format(root=str(ROOT)))
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "--max-restarts=2", str(script), "gmm", f"--out_dir={out}", *GMM]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stopped before its first checkpoint: it starts over" in done.stderr  # attempt 1
    assert "gmm:  50%" in done.stderr  # attempt 2 resumed from the checkpoint at step 2
    assert sorted(files(out)) == ["checkpoint.pt", "config.json", "gmm.png", "metrics.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kl_direct"] == straight[1]["kl_direct"]  # rank 0's direct baseline
    assert abs(metrics["kl_hypernetwork"] - straight[1]["kl_hypernetwork"]) <= 1e-5


# A checkpoint belongs to one run --------------------------------------------------------------


def test_resume_refuses_a_checkpoint_of_another_run_naming_both(tmp_path):
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    run(mine)
    run(theirs, "--lr=0.5")
    shutil.copyfile(theirs / "checkpoint.pt", mine / "checkpoint.pt")
    before = files(mine)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"checkpoint '{mine}/checkpoint.pt' belongs to another run: it was written by the "
            f"run 'gmm' in '{theirs}', whose config differs from this run's ('gmm' in '{mine}') "
            "in ['lr'] (lr: 0.5 there, 0.001 here)"
        ),
    ):
        run(mine, "--resume=true")
    assert files(mine) == before  # its metrics were not overwritten


def test_resume_refuses_a_checkpoint_of_another_architecture_naming_the_file(tmp_path):
    out = tmp_path / "run"
    run(out)
    path = out / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    other = HyperNetwork(1, [32, 64, 96], torch.nn.Linear(3, 2))  # another downstream
    checkpoint["models"]["hypernetwork"] = other.state_dict()
    torch.save(checkpoint, path)
    before = files(out)
    with pytest.raises(
        ValueError,
        match=rf"(?s){re.escape(str(path))}' does not fit this run's models \(written by "
        r"another version or architecture\?\); start a new run in a new out_dir\. .*"
        r"saved by a hypernetwork of another downstream",
    ):
        run(out, "--resume=true")
    assert files(out) == before


def test_a_checkpoint_without_its_config_resumes_with_a_warning(tmp_path, monkeypatch):
    out = tmp_path / "run"
    crash_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run(out)
    monkeypatch.undo()
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["config"]["out_dir"] == str(out)
    del checkpoint["config"]  # as an older trainer wrote it
    torch.save(checkpoint, out / "checkpoint.pt")
    with pytest.warns(UserWarning, match="records no config .*cannot check that it belongs"):
        run(out, "--resume=true")


# A run folder moved or copied elsewhere -----------------------------------------------------


@pytest.mark.parametrize("how", ["move", "copy"])
def test_a_moved_run_folder_resumes_where_it_is_now(tmp_path, monkeypatch, straight, how):
    old, new = tmp_path / "full" / "run", tmp_path / "other" / "run"
    crash_at(monkeypatch, 3)  # stopped after the checkpoint at step 2
    with pytest.raises(KeyboardInterrupt):
        run(old)
    monkeypatch.undo()
    new.parent.mkdir()
    if how == "move":
        shutil.move(old, new)
    else:  # copied off a full disk, say, and the original deleted
        shutil.copytree(old, new)
        shutil.rmtree(old)
    with pytest.raises(
        FileNotFoundError, match="folder was moved, pass where it is now: --out_dir="
    ):
        run(old, "--resume=true")
    before = files(new)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"cannot resume the run in '{new}': its config differs in ['lr']; only "
            "['device', 'distributed', 'out_dir', 'resume', 'threads'] may change when resuming"
        ),
    ):
        run(new, "--resume=true", "--lr=0.5")  # another config is still refused
    assert files(new) == before
    assert run(new, "--resume=true") == straight[1]
    assert_same_models(straight[0], new)
    assert not old.exists()  # nothing written where the folder was
    assert json.loads((new / "config.json").read_text())["out_dir"] == str(new)
    assert torch.load(new / "checkpoint.pt", weights_only=True)["config"]["out_dir"] == str(new)
    # Its config.json, itself a config file, now resumes it where it is.
    assert trainer.main([str(new / "config.json"), "--resume=true"]) == straight[1]


# A full disk ----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only); skipped where it cannot be mounted."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Fills ``disk`` to its last byte; returns the filler file."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(small_disk, monkeypatch, straight):
    out = small_disk / "run"
    state: dict = {}
    step, calls = trainer.train_step, {"n": 0}

    def filling(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # after the checkpoint at step 2
            state["checkpoint"] = (out / "checkpoint.pt").read_bytes()
            state["filler"] = fill(small_disk)
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", filling)
    with pytest.raises(
        OSError,
        match=re.escape(
            f"no space left on the device to write the checkpoint '{out}/checkpoint.pt'"
        )
        + r" \([\d,]+ bytes; [\d,]+ bytes free there\): the previous checkpoint.pt is intact and "
        r"no temporary file is left; free some space, then resume with --resume=true",
    ) as error:
        run(out)
    assert error.value.errno == 28  # ENOSPC
    assert (out / "checkpoint.pt").read_bytes() == state["checkpoint"]
    assert sorted(files(out)) == ["checkpoint.pt", "config.json"]  # no .tmp left behind
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2

    monkeypatch.undo()
    state["filler"].unlink()  # space again: the run resumes and ends as if never stopped
    assert run(out, "--resume=true") == straight[1]
    assert_same_models(out, straight[0])
