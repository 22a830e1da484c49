"""The experiments' trainer: configs, smoke runs of every experiment, exact resume, refusals."""

import dataclasses
import gzip
import importlib.util
import inspect
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import experiments.tasks  # noqa: E402
from experiments import EXPERIMENTS  # noqa: E402
from experiments import train as trainer  # noqa: E402
from experiments.common.data import load_mnist, read_idx  # noqa: E402
from experiments.config import config_from_dict, config_to_dict, load, load_config, load_run  # noqa: E402
from experiments.experiment import build_task, discover, experiment_of, registry, run_names  # noqa: E402

needs_diffusers = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason="needs diffusers"
)

# Tiny settings: a few steps, small evaluations.
TINY = {
    "gmm": ["--steps=4", "--batch_size=64", "--task.n_train=64", "--task.mc_samples=500"],
    "gmm_amortized": [
        "--steps=4",
        "--batch_size=32",
        "--sets_per_step=2",
        "--task.mc_samples=500",
        "--task.eval_datasets=2",
        "--task.direct_steps=3",
    ],
    "flow": ["--steps=4", "--batch_size=64", "--task.n_train=64"],
    "flow_amortized": [
        "--steps=4",
        "--batch_size=32",
        "--task.eval_datasets=2",
        "--task.direct_steps=3",
    ],
    "flow_out_of_range": [
        "--steps=4",
        "--batch_size=32",
        "--task.eval_datasets=2",
        "--task.direct_steps=3",
    ],
    "vae": ["--steps=4", "--batch_size=16", "--task.elbo_samples=1", "--task.max_train=200"],
    "vae_amortized": [
        "--steps=4",
        "--batch_size=8",
        "--task.elbo_samples=1",
        "--task.max_train=200",
    ],
    "ddpm": [
        "--steps=3",
        "--batch_size=4",
        "--head=chunked",
        "--task.block_out_channels=[8,16]",
        "--task.norm_num_groups=4",
        "--task.num_train_timesteps=20",
        "--task.sample_steps=2",
        "--task.samples_per_class=2",
        "--task.classifier_steps=3",
        "--task.max_train=200",
    ],
}
PLOTS = {"gmm": "gmm.png", "flow": "flow.png", "vae": "vae.png", "ddpm": "ddpm.png"}


def run(name: str, out: Path, *extra: str) -> dict:
    return trainer.main(
        [
            name,
            f"--out_dir={out}",
            "--checkpoint_every=2",
            *TINY[name],
            *extra,
        ]
    )


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


# Configs ------------------------------------------------------------------------------------


def test_every_run_loads():
    assert sorted(run_names()) == sorted(TINY)
    for name in TINY:
        config = load_run(name)
        assert config.hidden_sizes == [32, 64, 96] and config.out_dir == f"runs/{name}"
        assert experiment_of(name).name == config.experiment == name.split("_")[0]


def test_a_run_printed_as_json_loads_back_to_the_same_config(tmp_path, capsys):
    # The runs are declared once, in their experiment's module; --print-config writes one as
    # a config file, which loads back to the very same config.
    for name in TINY:
        printed = trainer.main([name, "--print-config", "--steps=7"])
        path = tmp_path / f"{name}.json"
        path.write_text(capsys.readouterr().out)
        assert json.loads(path.read_text()) == printed
        assert config_to_dict(load_config(path)) == config_to_dict(load_run(name, ["--steps=7"]))
        assert config_to_dict(load(str(path))) == printed  # what the command reads
    assert not (tmp_path / "runs").exists()  # printing trains nothing

    # A config file trains, and its run folder's config.json is again a config file.
    out = tmp_path / "from-json"
    trainer.main([str(tmp_path / "gmm.json"), f"--out_dir={out}", *TINY["gmm"]])
    last = capsys.readouterr().out.strip().splitlines()[-1]  # the command ends with its folder
    assert last == f"run folder: {out} (checkpoint.pt, config.json, gmm.png, metrics.json)"
    saved = load_config(out / "config.json")
    assert config_to_dict(saved) == config_to_dict(
        load_run("gmm", [f"--out_dir={out}", *TINY["gmm"]])
    )

    with pytest.raises(ValueError, match=r"'gmm_amortised' is neither a registered run \(one of"):
        load("gmm_amortised")
    with pytest.raises(FileNotFoundError, match="config file 'nope.json' does not exist"):
        load("nope.json")


def test_the_registry_lists_every_experiment_with_a_summary():
    assert list(EXPERIMENTS)[:4] == ["gmm", "flow", "vae", "ddpm"]
    for name, experiment in EXPERIMENTS.items():
        assert experiment.name == name
        assert inspect.getdoc(experiment) and "\n\n" not in experiment.__doc__  # for the docs
        experiment.config().validate(f"config.task ({name})")  # the defaults are valid
    assert inspect.getdoc(EXPERIMENTS["gmm"]).startswith("GMM: a hypernetwork reads samples")
    with pytest.raises(ValueError, match=r"run must be one of \['gmm', 'gmm_amortized'"):
        load_run("gmm_ammortized")


def test_overrides_are_parsed_as_json_and_checked():
    config = load_run(
        "gmm",
        ["--steps=7", "--out_dir=runs/x", "--task.means=[1, 3]", "--resume=true", "--lr=1"],
    )
    assert (config.steps, config.out_dir, config.task.means, config.resume) == (
        7,
        "runs/x",
        [1.0, 3.0],
        True,
    )
    assert config.lr == 1.0 and isinstance(config.lr, float)
    with pytest.raises(ValueError, match="overrides must look like --key=value"):
        load_run("gmm", ["--steps", "7"])


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (
            {"stepz": 3},
            ValueError,
            r"config has unknown keys \['stepz'\]; valid keys are \[.*'steps'",
        ),
        (
            {"task": {"weightz": [1.0]}},
            ValueError,
            r"config.task \(gmm\) has unknown keys \['weightz'\]",
        ),
        ({"steps": "100"}, TypeError, r"config.steps must be int, got str '100'"),
        ({"steps": 1.5}, TypeError, r"config.steps must be int, got float 1.5"),
        ({"resume": 1}, TypeError, r"config.resume must be bool, got int 1"),
        ({"hidden_sizes": "32,64"}, TypeError, r"config.hidden_sizes must be a JSON list, got str"),
        (
            {"hidden_sizes": []},
            ValueError,
            r"config.hidden_sizes must be a non-empty list of positive ints, got \[\]",
        ),
        (
            {"device": "tpu"},
            ValueError,
            r"config.device must be one of \['cpu', 'cuda'\], got 'tpu'",
        ),
        ({"lr": -0.1}, ValueError, r"config: lr=-0.1 must be > 0"),
        (
            {"task": {"variances": [1.0, -1.0]}},
            ValueError,
            r"config.task \(gmm\).variances must all be > 0, got \[1.0, -1.0\]",
        ),
        ({"task": {"weights": [0.5, 0.6]}}, ValueError, r"weights must be positive and sum to 1"),
        (
            {"task": {"means": [0.0]}},
            ValueError,
            r"must be non-empty lists of one length, got 2, 1 and 2",
        ),
        (
            {"experiment": "gan"},
            ValueError,
            r"config.experiment must be one of \['gmm', 'flow', 'vae', 'ddpm'.*\], got 'gan'",
        ),
        ({"base": "x"}, ValueError, r"config.base must be one of \['learned', 'frozen', 'none'\]"),
        ({"pool": "median"}, ValueError, r"config.pool must be one of \['mean', 'sum', 'max'"),
    ],
)
def test_bad_configs_are_rejected_with_clear_messages(tmp_path, change, error, message):
    data = EXPERIMENTS["gmm"].run_config("gmm")
    for key, value in change.items():
        if key == "task" and not set(value) & {"weightz"}:
            data["task"].update(value)
        else:
            data[key] = value
    with pytest.raises(error, match=message):
        load_config(write(tmp_path, data))


def test_bad_flow_and_digit_task_values(tmp_path):
    with pytest.raises(ValueError, match=r"config.task \(flow\).variances must all be > 0"):
        load_run("flow", ["--task.variances=[1,2,3,4,5,6,7,8,9,10,11,-12]"])
    with pytest.raises(
        ValueError,
        match=r"config.task \(vae\).hidden_sizes must be a non-empty list of positive ints, got",
    ):
        load_run("vae", ["--task.hidden_sizes=[]"])
    with pytest.raises(ValueError, match=r"data_path must name MNIST's .npz file or IDX folder"):
        load_run("vae", ["--task.dataset=mnist"])
    with pytest.raises(FileNotFoundError, match="config file .*nope.json' does not exist"):
        load_config(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_config(tmp_path / "broken.json")


def test_a_renamed_key_of_an_earlier_config_is_read_under_its_new_name(tmp_path):
    data = EXPERIMENTS["vae"].run_config("vae")
    data["task"]["model_hidden"] = data["task"].pop("hidden_sizes")  # as 0.3 wrote it
    renamed = r"config.task \(vae\).model_hidden is now config.task \(vae\).hidden_sizes"
    with pytest.warns(UserWarning, match=renamed):
        config = load_config(write(tmp_path, data))
    assert config.task.hidden_sizes == [128] and config_to_dict(config) == config_to_dict(
        load_run("vae")
    )
    data["task"]["hidden_sizes"] = [64]
    with pytest.raises(ValueError, match=r"both \['model_hidden'\] and their new names"):
        load_config(write(tmp_path, data))
    # The old command-line flags too: an override under the old name sets the new one.
    with pytest.warns(UserWarning, match=r"--task.model_hidden is now --task.hidden_sizes"):
        assert load_run("vae", ["--task.model_hidden=[64]"]).task.hidden_sizes == [64]
    with pytest.warns(UserWarning, match=r"--task.timesteps is now --task.num_train_timesteps"):
        assert load_run("ddpm", ["--task.timesteps=500"]).task.num_train_timesteps == 500


def test_a_run_folder_of_an_earlier_version_resumes(tmp_path):
    out = tmp_path / "run"
    metrics = run("vae", out)
    # Its config.json and checkpoint as 0.3 wrote them: the VAE's widths under model_hidden.
    config = json.loads((out / "config.json").read_text())
    config["task"]["model_hidden"] = config["task"].pop("hidden_sizes")
    (out / "config.json").write_text(json.dumps(config))
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    checkpoint["config"] = config
    torch.save(checkpoint, out / "checkpoint.pt")
    with pytest.warns(UserWarning, match="model_hidden is now"):
        assert run("vae", out, "--resume=true") == metrics  # finished: evaluated again
    with pytest.warns(UserWarning, match="model_hidden is now"):
        assert trainer.main([str(out / "config.json"), "--resume=true"]) == metrics


# Adding an experiment: one module ---------------------------------------------------------------

# A complete experiment, as a new experiments/tasks/line.py would hold it: nothing else names it.
LINE = '''"""Line: a hypernetwork reads points of a noisy line and generates it, a Linear(1, 1)."""

from dataclasses import dataclass

import torch
from torch import nn

from experiments.config import check_positive
from experiments.experiment import Experiment, Task, number, within


@dataclass
class LineConfig:
    slope: float = 1.5
    noise: float = 0.1

    def validate(self, where):
        check_positive(where, noise=self.noise)


class LineTask(Task):
    def __init__(self, config, device):
        super().__init__(config, device)
        self.downstream = nn.Linear(1, 1).requires_grad_(False)
        self.input_dim, self.num_datasets = 2, 1

    def sample(self, generator):
        x = torch.rand(self.config.batch_size, 1, generator=generator)
        noise = self.config.task.noise * torch.randn(x.shape, generator=generator)
        return 0, torch.cat([x, self.config.task.slope * x + noise], 1)

    def loss(self, params, batch):
        y = torch.func.functional_call(self.downstream, params, (batch[:, :1],))
        return (y - batch[:, 1:]).square().mean()

    def evaluate(self, hypernetwork, direct, history, out):
        batch = self.sample(torch.Generator().manual_seed(1))[1]
        with torch.no_grad():
            hyper = self.loss(hypernetwork(batch), batch).item()
            fit = self.loss(dict(direct[0].named_parameters()), batch).item()
        within_10 = within(hyper, fit)
        return {"mse_hypernetwork": hyper, "mse_direct": fit, "within_10_percent": within_10}


def _row(m):
    return ["Line", "MSE", number(m["mse_hypernetwork"]), number(m["mse_direct"]), "-"]


EXPERIMENT = Experiment(
    "line", LineConfig, LineTask, runs={"line": {"steps": 3, "batch_size": 16}}, row=_row
)
'''


@pytest.fixture
def more_tasks(tmp_path, monkeypatch):
    """A folder searched as a part of experiments/tasks/: a module there is an experiment."""
    folder = tmp_path / "more_tasks"
    folder.mkdir()
    monkeypatch.setattr(experiments.tasks, "__path__", [*experiments.tasks.__path__, str(folder)])
    yield folder
    for name in [m for m in sys.modules if m.startswith("experiments.tasks.")]:
        if str(folder) in (getattr(sys.modules[name], "__file__", None) or ""):
            del sys.modules[name]


def test_a_new_experiment_is_one_module(tmp_path, more_tasks):
    (more_tasks / "helper.py").write_text("X = 1\n")  # no EXPERIMENT: a helper, skipped
    (more_tasks / "line.py").write_text(LINE)
    found = discover()
    assert list(found) == [*EXPERIMENTS, "line"]
    assert found["line"].__doc__.startswith("Line: a hypernetwork reads points")  # for the docs

    # Its config: the registry's names, its task fields and their validation.
    config = config_from_dict({"experiment": "line", "out_dir": str(tmp_path / "a")})
    assert type(config.task).__name__ == "LineConfig" and config.task.slope == 1.5
    with pytest.raises(ValueError, match=r"config.task \(line\): noise=0.0 must be > 0"):
        load_run("line", ["--task.noise=0"])
    with pytest.raises(ValueError, match=r"must be one of \['gmm', .*'line'\], got 'gan'"):
        config_from_dict({"experiment": "gan", "out_dir": "x"})

    # Built and trained by the trainer's own functions, then by its command, then tabulated.
    task = build_task(config, torch.device("cpu"))
    hypernetwork, direct = trainer.build_models(config, task, torch.device("cpu"))
    optimizers = trainer.build_optimizers(config, hypernetwork, direct)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        losses = trainer.train_step(config, task, hypernetwork, direct, optimizers, generator)
        assert all(np.isfinite(v) for v in losses.values())
    metrics = trainer.main(["line", f"--out_dir={tmp_path / 'b'}", "--checkpoint_every=2"])
    assert metrics["experiment"] == "line" and (tmp_path / "b" / "checkpoint.pt").is_file()
    from experiments import results

    row = results.table({"line": {**metrics, "seconds": 1.0}}).splitlines()[-1]
    assert row.startswith("| Line | MSE |") and "| 3 | 1 |" in row


def test_an_experiment_module_is_named_as_its_experiment_and_its_runs(more_tasks):
    (more_tasks / "lines.py").write_text(LINE)  # declares "line" in lines.py
    with pytest.raises(ValueError, match="defines experiment 'line': an experiment's module is"):
        discover()
    with pytest.raises(ValueError, match=r"starts with 'gmm_' .*got \['line'\]"):
        dataclasses.replace(EXPERIMENTS["gmm"], runs={"gmm": {}, "line": {}})


def test_registry_refuses_clashing_names():
    gmm = EXPERIMENTS["gmm"]
    amortized = dataclasses.replace(gmm, name="gmm_amortized", runs={"gmm_amortized": {}})
    with pytest.raises(
        ValueError, match="run 'gmm_amortized' of experiment 'gmm_amortized' is already a run of"
    ):
        registry([gmm, amortized])
    with pytest.raises(ValueError, match="two experiments are named 'gmm'"):
        registry([gmm, dataclasses.replace(gmm, runs={})])


def test_a_run_imports_its_own_experiment_alone(tmp_path):
    # In a fresh interpreter, the modules a GMM run has imported when its evaluation starts, and
    # when it ends: no other experiment, nor the digits, the judge, diffusers or scipy. Its
    # evaluation then imports scikit-learn for its EM baseline, and scipy with it.
    code = f"""
import json, sys
from experiments import train
from experiments.tasks.gmm import GMMTask

def imported():
    mine = [m for m in sys.modules if m.split(".")[0] == "experiments"]
    return sorted(mine + [m for m in ("diffusers", "scipy", "sklearn") if m in sys.modules])

finish, seen = GMMTask.finish, []
GMMTask.finish = lambda *args: seen.append(imported()) or finish(*args)
train.main(["gmm", "--out_dir={tmp_path / "run"}", *{TINY["gmm"]!r}])
print(json.dumps([seen[0], imported()]))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = json.loads(done.stdout.strip().splitlines()[-1])
    assert before == [
        "experiments",
        "experiments.checkpoint",
        "experiments.common",
        "experiments.common.fit",
        "experiments.common.plots",
        "experiments.config",
        "experiments.distributed",
        "experiments.experiment",
        "experiments.runs",
        "experiments.tasks",
        "experiments.tasks.gmm",
        "experiments.train",
    ]
    assert after == sorted([*before, "scipy", "sklearn"])  # the EM baseline's


# Smoke runs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [n for n in TINY if n != "ddpm"] + [pytest.param("ddpm", marks=needs_diffusers)]
)
def test_each_experiment_runs_and_writes_metrics_and_plots(tmp_path, name):
    out = tmp_path / name
    metrics = run(name, out)
    experiment = name.split("_")[0]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["experiment"] == experiment and saved["steps"] == metrics["steps"]
    assert isinstance(saved["within_10_percent"], bool)
    numbers = [v for k, v in saved.items() if isinstance(v, float)]
    assert numbers and all(np.isfinite(numbers))
    assert (out / PLOTS[experiment]).stat().st_size > 1000
    width, height = struct.unpack(">II", (out / PLOTS[experiment]).read_bytes()[16:24])
    assert width >= 1000, f"{PLOTS[experiment]} is {width}x{height} pixels"
    assert json.loads((out / "config.json").read_text())["out_dir"] == str(out)
    assert (out / "checkpoint.pt").is_file() and not list(out.glob("*.tmp"))


# Exact resume ---------------------------------------------------------------------------------


def _params(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)["models"]


@pytest.mark.parametrize("name", ["gmm_amortized", "vae_amortized"])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, monkeypatch, name):
    run(name, tmp_path / "straight", "--steps=6")

    calls = {"n": 0}
    step = trainer.train_step

    def crash_on_fifth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # the user's Ctrl-C, after the checkpoint at step 4
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        run(name, tmp_path / "resumed", "--steps=6")
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(trainer, "train_step", step)
    run(name, tmp_path / "resumed", "--steps=6", "--resume=true")

    straight, resumed = _params(tmp_path / "straight"), _params(tmp_path / "resumed")
    for model in ("hypernetwork", "direct"):
        assert straight[model].keys() == resumed[model].keys()
        for key, value in straight[model].items():
            assert torch.equal(value, resumed[model][key]), f"{model}.{key} differs after resuming"
    metrics = [
        json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "resumed")
    ]
    assert metrics[0] == metrics[1]


# Refusals: nothing on disk is overwritten or lost -------------------------------------------


def test_refuses_a_non_empty_out_dir_and_leaves_it_untouched(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(
        FileExistsError, match="already exists and is not empty; choose a new out_dir"
    ):
        run("gmm", out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (
        out / "notes.txt"
    ).read_text() == "precious"


def test_resume_errors_missing_corrupt_and_changed(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot resume: .*config.json' does not exist"):
        run("gmm", tmp_path / "nothing", "--resume=true")
    out = tmp_path / "run"
    run("gmm", out)
    good = (out / "checkpoint.pt").read_bytes()

    (out / "checkpoint.pt").unlink()
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from at"):
        run("gmm", out, "--resume=true")

    (out / "checkpoint.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="is corrupt or truncated and cannot be loaded"):
        run("gmm", out, "--resume=true")
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is corrupt or truncated"):
        run("gmm", out, "--resume=true")
    assert (
        out / "checkpoint.pt"
    ).read_bytes() == b"not a checkpoint"  # left for the user to inspect

    torch.save({"weights": torch.zeros(2)}, out / "checkpoint.pt")
    with pytest.raises(ValueError, match="is not a checkpoint of torchhyper's experiments"):
        run("gmm", out, "--resume=true")

    with pytest.raises(ValueError, match=r"its config differs in \['lr'\]"):
        run("gmm", out, "--resume=true", "--lr=0.5")


def test_cuda_request_without_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ValueError, match="config.device is 'cuda' but CUDA is not available"):
        run("gmm", tmp_path / "run", "--device=cuda")


# MNIST files ----------------------------------------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _tiny_mnist(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "x_train": rng.integers(0, 256, (30, 28, 28)),
        "y_train": np.arange(30) % 10,
        "x_test": rng.integers(0, 256, (10, 28, 28)),
        "y_test": np.arange(10),
    }


def test_mnist_from_idx_files_and_npz(tmp_path):
    arrays = _tiny_mnist(np.random.default_rng(0))
    names = {
        "x_train": "train-images-idx3-ubyte",
        "y_train": "train-labels-idx1-ubyte",
        "x_test": "t10k-images-idx3-ubyte.gz",
        "y_test": "t10k-labels-idx1-ubyte",
    }
    for key, name in names.items():
        raw = _idx(arrays[key])
        (tmp_path / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    np.savez(tmp_path / "mnist.npz", **{k: v.astype(np.uint8) for k, v in arrays.items()})
    for source in (tmp_path, tmp_path / "mnist.npz"):
        images = load_mnist(source)
        assert images.x_train.shape == (30, 1, 28, 28) and images.x_test.shape == (10, 1, 28, 28)
        np.testing.assert_allclose(images.x_train[:, 0].numpy() * 255, arrays["x_train"], atol=1e-4)
        assert images.y_test.tolist() == list(range(10))

    (tmp_path / "bad").write_bytes(b"\x08\x03\x00\x00")
    with pytest.raises(ValueError, match="is not an IDX file: bad magic number 08030000"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx(arrays["y_test"])[:-3])
    with pytest.raises(ValueError, match=r"is truncated or too long: header says \[10\]"):
        read_idx(tmp_path / "short")
    shutil.move(tmp_path / "train-labels-idx1-ubyte", tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="lacks train-labels-idx1-ubyte"):
        load_mnist(tmp_path)
    np.savez(tmp_path / "partial.npz", x_train=arrays["x_train"])
    with pytest.raises(ValueError, match=r"lacks the keys \['y_train', 'x_test', 'y_test'\]"):
        load_mnist(tmp_path / "partial.npz")


def test_vae_trains_on_user_supplied_mnist(tmp_path):
    arrays = _tiny_mnist(np.random.default_rng(1))
    np.savez(tmp_path / "mnist.npz", **{k: v.astype(np.uint8) for k, v in arrays.items()})
    metrics = run(
        "vae",
        tmp_path / "run",
        "--task.dataset=mnist",
        f"--task.data_path={tmp_path / 'mnist.npz'}",
    )
    assert np.isfinite(metrics["elbo_hypernetwork"]) and metrics["test_images"] == 10


def test_results_command_tabulates_runs_and_reuses_finished_ones(tmp_path):
    from experiments import results

    args = [
        "--out",
        str(tmp_path / "runs"),
        "--docs",
        str(tmp_path / "docs"),
        "--only",
        "gmm",
        "--steps=3",
        "--batch_size=64",
        "--task.n_train=64",
        "--task.mc_samples=500",
    ]
    results.main(args)
    text = (tmp_path / "docs" / "results.md").read_text()
    provenance, table = text.split("\n\n", 1)  # how it was made, then the table
    assert "- command: `python" in provenance and "- commit: " in provenance
    assert table.startswith("| experiment | metric | hypernetwork | direct |")
    assert "docs/results/gmm.png" in table
    assert (tmp_path / "docs" / "gmm.png").is_file()
    before = (tmp_path / "runs" / "gmm" / "metrics.json").stat().st_mtime_ns
    results.main(args)  # a finished run is reused, not retrained or overwritten
    assert (tmp_path / "runs" / "gmm" / "metrics.json").stat().st_mtime_ns == before
    results.main([*args[:4], "--tables-only"])  # the tables again, from the saved metrics
    again = (tmp_path / "docs" / "results.md").read_text()
    assert again.split("\n\n", 1)[1] == table


def test_out_of_range_flow_is_evaluated_beyond_its_training_variances(tmp_path):
    from experiments.tasks.flow import EXPERIMENT as FLOW

    metrics = run("flow_out_of_range", tmp_path / "out")
    assert metrics["variance_range"] == [0.5, 12.0]
    assert metrics["eval_variance_range"] == [12.0, 24.0]
    assert "out of range** (variances 12-24, trained on 0.5-12)" in FLOW.row(metrics)[0]
    inside = run("flow_amortized", tmp_path / "in")
    assert "out of range" not in FLOW.row(inside)[0]


def test_cnn_encoder_reads_the_digit_sets_as_images(tmp_path):
    from experiments.train import build_models

    config = load_run("vae_amortized", [f"--out_dir={tmp_path / 'x'}", "--encoder=cnn"])
    task = EXPERIMENTS["vae"].task(config, torch.device("cpu"))
    hypernetwork, _ = build_models(config, task, torch.device("cpu"))
    assert any(isinstance(m, torch.nn.Conv2d) for m in hypernetwork.encoder.modules())
    metrics = run("vae_amortized", tmp_path / "run", "--encoder=cnn")
    assert np.isfinite(metrics["elbo_hypernetwork"])
    with pytest.raises(ValueError, match="encoder='cnn' needs image examples"):
        run("gmm_amortized", tmp_path / "gmm", "--encoder=cnn")


@pytest.mark.parametrize("study", ["ddpm_gap", "fd_noise", "set_encoding"])
def test_each_study_runs_as_a_module_of_the_experiments(study):
    # Beside the experiments, its results in the docs; no sys.path edits; its command as typed.
    path = ROOT / "experiments" / "studies" / f"{study}.py"
    assert "sys.path" not in path.read_text()
    assert (ROOT / "docs" / "results" / f"{study.replace('_', '-')}.md").is_file()
    done = subprocess.run(
        [sys.executable, "-m", f"experiments.studies.{study}", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]
    code = "import sys; from experiments.studies import header; print(header())"
    done = subprocess.run(
        [sys.executable, "-c", code, "--x=1"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("- command: `python -c --x=1`\n- commit: ")
    assert "torch " in done.stdout and "threads: " in done.stdout and "date: " in done.stdout
