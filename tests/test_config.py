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


def test_impossible_layout_without_processes():
    with pytest.raises(ValueError, match="num_shards=2 needs torch.distributed"):
        ParallelLayout.build(2)
    assert ParallelLayout.build(None).world_size == 1


def test_defaults_are_valid_and_are_the_digits_demo():
    # launch/run.py --help promises that running without --config is the digits demo.
    assert isinstance(load_config(), Config)
    assert load_config().to_dict() == load_config(Path(__file__).resolve().parent.parent / "configs" / "digits.yaml").to_dict()
