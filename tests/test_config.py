"""Config files, overrides and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvb_dist.run.config import Config, load_config
from kvb_dist.distributed.layout import ParallelLayout

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.run.name == path.stem


def test_overrides_are_converted_to_the_field_type():
    config = load_config(None, ["train.lr=0.5", "bottleneck.num_codebooks=8", "train.mask_unused_pairs=false",
                                "train.learners=kvb,mlp", "run.name=x"])
    assert config.train.lr == 0.5 and isinstance(config.train.lr, float)
    assert config.bottleneck.num_codebooks == 8
    assert config.train.mask_unused_pairs is False
    assert config.train.learners == ["kvb", "mlp"]
    assert config.run_dir == Path("runs") / "x"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.learning_rate=0.1"], r"unknown config key 'train.learning_rate'.*valid keys.*'lr'"),
        (["optim.lr=0.1"], r"unknown config section 'optim'.*valid sections"),
        (["train.lr=fast"], r"train.lr must be of type float"),
        (["bottleneck.num_codebooks=2.5"], r"bottleneck.num_codebooks must be of type int"),
        (["encoder.name=resnet"], r"encoder.name='resnet' is not valid; choose from"),
        (["train.learners=kvb,svm"], r"train.learners='svm' is not valid"),
        (["bottleneck.topk=600"], r"bottleneck.topk=600 exceeds"),
        (["bottleneck.dim_keys=0"], r"bottleneck.dim_keys must be >= 1"),
        (["train.lr"], r"must look like section.key=value"),
    ],
)
def test_bad_overrides_raise_clear_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_bad_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps_per_task: many\n")
    with pytest.raises(ValueError, match="train.steps_per_task must be of type int"):
        load_config(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("train:\n  steps_per_task: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)


def test_impossible_layout_without_processes():
    with pytest.raises(ValueError, match="num_shards=2 needs torch.distributed"):
        ParallelLayout.build(2)
    assert ParallelLayout.build(None).world_size == 1


def test_defaults_are_valid_and_are_the_digits_demo():
    # The launcher's --help promises that running without --config is the digits demo.
    assert isinstance(load_config(), Config)
    assert load_config().to_dict() == load_config(Path(__file__).resolve().parent.parent / "configs" / "digits.yaml").to_dict()


@pytest.mark.parametrize(
    "overrides, match",
    [
        # Non-finite floats: none of them has a meaning at NaN or infinity.
        (["train.lr=inf"], r"train.lr must be a finite number"),
        (["train.lr=nan"], r"train.lr must be a finite number"),
        (["train.baseline_lr=-inf"], r"train.baseline_lr must be a finite number"),
        (["bottleneck.eps=inf"], r"bottleneck.eps must be a finite number"),
        (["bottleneck.decay=nan"], r"bottleneck.decay must be a finite number"),
        (["data.test_fraction=nan"], r"data.test_fraction must be a finite number"),
        (["bottleneck.threshold_ema_dead_code=inf"], r"bottleneck.threshold_ema_dead_code must be a finite number"),
        (["train.label_smoothing=nan"], r"train.label_smoothing must be a finite number"),
        (["train.grad_clip=inf"], r"train.grad_clip must be a finite number"),
        # Ranges.
        (["train.lr=0"], r"train.lr must be > 0"),
        (["train.lr=-0.1"], r"train.lr must be > 0"),
        (["train.baseline_lr=0"], r"train.baseline_lr must be > 0"),
        (["bottleneck.eps=0"], r"bottleneck.eps must be > 0"),
        (["bottleneck.eps=-1e-5"], r"bottleneck.eps must be > 0"),
        (["train.steps_per_task=0"], r"train.steps_per_task must be >= 1"),
        (["train.iid_steps=-5"], r"train.iid_steps must be >= 1"),
        (["init.kmeans_iters=-1"], r"init.kmeans_iters must be >= 0"),
        (["init.ema_epochs=-1"], r"init.ema_epochs must be >= 0"),
        (["bottleneck.threshold_ema_dead_code=-0.1"], r"bottleneck.threshold_ema_dead_code must be >= 0"),
        (["train.grad_clip=-1"], r"train.grad_clip must be >= 0"),
        (["run.threads=-2"], r"run.threads must be >= 0"),
        (["train.label_smoothing=1.0"], r"train.label_smoothing must be in \[0, 1\)"),
        (["train.label_smoothing=-0.1"], r"train.label_smoothing must be in \[0, 1\)"),
        (["run.seed=-1"], r"run.seed must be in \[0, 2\*\*63\)"),
        (["run.seed=9223372036854775808"], r"run.seed must be in \[0, 2\*\*63\)"),
        # run.name must name a folder inside run.out_dir.
        (["run.name=../x"], r"run.name='../x' has a '..' part.*inside run.out_dir"),
        (["run.name=a/../../b"], r"run.name='a/../../b' has a '..' part"),
        (["run.name=a/.."], r"run.name='a/..' has a '..' part"),
        (["run.name=/tmp/x"], r"run.name='/tmp/x' is an absolute path"),
        (["run.name="], r"run.name='' names run.out_dir itself"),
        (["run.name=."], r"run.name='.' names run.out_dir itself"),
        # Duplicates and impossible combinations.
        (["train.settings=iid,iid"], r"train.settings lists \['iid'\] more than once"),
        (["train.learners=kvb,mlp,kvb"], r"train.learners lists \['kvb'\] more than once"),
        (["data.num_tasks=6"], r"data.num_tasks x data.classes_per_task = 6 x 2 = 12 exceeds the 10 classes of data.dataset='digits'"),
        (["data.dataset=cifar10", "data.classes_per_task=11", "data.num_tasks=1"], r"exceeds the 10 classes of data.dataset='cifar10'"),
        (["data.dataset=toy", "data.num_tasks=5"], r"data.num_tasks x data.classes_per_task = 5 x 2 = 10 exceeds the 8 classes of data.dataset='toy'"),
    ],
)
def test_impossible_values_raise_at_load(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_limits_themselves_are_valid():
    config = load_config(None, ["run.seed=9223372036854775807", "train.label_smoothing=0.0", "init.kmeans_iters=0",
                                "init.ema_epochs=0", "train.grad_clip=0", "run.name=exp/a", "run.name=exp/./b",
                                "data.num_tasks=1", "data.classes_per_task=10"])
    assert config.run_dir == Path("runs") / "exp" / "b"
    assert load_config(None, ["data.dataset=toy", "data.num_tasks=4"]).data.num_tasks == 4


@pytest.mark.parametrize(
    "overrides, world_size, match",
    [
        (["train.batch_size=64"], 3, r"train.batch_size=64 must be divisible by the world size 3.*multiples of 3, e.g. 63 or 66"),
        (["train.batch_size=2"], 4, r"train.batch_size=2 must be divisible by the world size 4.*e.g. 4$"),
        (["train.batch_size=8", "init.method=ema", "init.batch_size=4"], 8, r"init.batch_size=4 must be >= the world size 8"),
        ([], 0, r"world_size must be a positive integer"),
    ],
)
def test_world_size_checks(overrides, world_size, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides, world_size=world_size)


def test_world_size_checks_pass_when_they_should():
    assert load_config(None, ["train.batch_size=64"], world_size=8).train.batch_size == 64
    # k-means takes init.batch_size per rank: no lower bound from the world size.
    assert load_config(None, ["train.batch_size=8", "init.method=kmeans", "init.batch_size=4"], world_size=8)
    assert load_config(None, ["train.batch_size=63"]).train.batch_size == 63  # no world size, no check


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_on_common_world_sizes(path, world_size):
    assert load_config(path, world_size=world_size).run.name == path.stem


def load_launcher():
    from kvb_dist.run import launcher

    return launcher


def test_print_config_prints_the_resolved_config_as_yaml_that_loads_back(tmp_path, capsys):
    launch_run = load_launcher()
    toy = str(Path(__file__).resolve().parents[1] / "configs" / "toy.yaml")
    assert launch_run.main(["--config", toy, "--print-config", "train.lr=0.25"]) == 0
    printed = capsys.readouterr().out
    assert "lr: 0.25" in printed
    (tmp_path / "printed.yaml").write_text(printed)
    assert load_config(tmp_path / "printed.yaml").to_dict() == load_config(toy, ["train.lr=0.25"]).to_dict()


def test_overrides_after_phases_are_overrides():
    launch_run = load_launcher()
    args = launch_run.parse_args(["--phases", "train", "evaluate", "run.name=x", "train.lr=0.1"])
    assert args.phases == ["train", "evaluate"] and args.overrides == ["run.name=x", "train.lr=0.1"]
    args = launch_run.parse_args(["train.lr=0.1", "--phases", "freeze", "run.name=x"])
    assert args.phases == ["freeze"] and sorted(args.overrides) == ["run.name=x", "train.lr=0.1"]
    with pytest.raises(SystemExit):
        launch_run.parse_args(["--phases", "fit"])  # not a phase
    with pytest.raises(SystemExit):
        launch_run.parse_args(["--phases", "run.name=x"])  # no phase left


class _FakeAccelerator:
    def __init__(self, is_main_process):
        self.is_main_process = is_main_process
        self.started = []

    def init_trackers(self, project, config, init_kwargs):
        self.started.append(init_kwargs["wandb"]["id"])


def test_only_the_main_process_makes_the_wandb_run_id_and_a_resume_keeps_it(tmp_path, monkeypatch):
    from kvb_dist.run import tracking

    config = load_config(None, ["run.tracker=wandb", "run.wandb_mode=offline"])
    others = [_FakeAccelerator(False) for _ in range(3)]
    for accelerator in others:  # ranks 1..3 first: they must neither read nor write the id
        tracking.Tracker(accelerator, config, tmp_path)
    assert not (tmp_path / "wandb_run_id").exists() and not any(a.started for a in others)
    first, resumed = _FakeAccelerator(True), _FakeAccelerator(True)
    tracking.Tracker(first, config, tmp_path)
    tracking.Tracker(resumed, config, tmp_path)  # the same run folder after a restart
    assert len(first.started[0]) == 12 and resumed.started == first.started
    assert (tmp_path / "wandb_run_id").read_text() == first.started[0]
    assert not list(tmp_path.glob(".wandb_run_id.tmp-*"))
