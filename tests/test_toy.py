"""The paper's Fig. 2 toy: the bottleneck learns 8 classes in 4 tasks without forgetting."""

import pytest
import torch

from kvb_dist import demo
from kvb_dist.toy import NUM_CLASSES, TASKS, ToyConfig, class_centers, run_protocol, sample_classes, evaluation_set


def test_classes_are_distinct_regions_inside_the_unit_square():
    config = ToyConfig()
    centers = class_centers(config)
    gaps = torch.cdist(centers, centers) + torch.eye(NUM_CLASSES)
    assert gaps.min() > 6 * config.cluster_std
    points, labels = sample_classes((2, 5), 1000, config, torch.Generator().manual_seed(0))
    assert set(labels.tolist()) == {2, 5}
    assert points.min() >= 0 and points.max() <= 1
    test_points, test_labels = evaluation_set(config)
    assert torch.bincount(test_labels).tolist() == [config.test_points_per_class] * NUM_CLASSES


@pytest.mark.timeout(120)
def test_bottleneck_does_not_forget_while_probe_does():
    records = run_protocol(ToyConfig(seed=0))
    assert [r["classes"] for r in records] == list(TASKS)
    for record in records:  # every learner masters the task at hand; only the bottleneck keeps the past
        assert record["kvb"]["seen"] >= 0.95, record
    final = records[-1]
    assert final["kvb"]["all"] >= 0.95, final
    assert final["linear"]["all"] <= 0.35, final
    # Training fetched only pairs near the data, so some pairs stay unused and are masked.
    assert 0 < final["kvb_unused_pairs"] < 1


@pytest.mark.timeout(60)
def test_demo_prints_a_table_per_task_and_a_summary(capsys):
    demo.main(["--steps-per-task", "20", "--key-init-steps", "20", "--num-pairs", "50"])
    out = capsys.readouterr().out
    assert out.count("after task") == len(TASKS)
    assert "summary" in out and "linear probe" in out and "MLP" in out
