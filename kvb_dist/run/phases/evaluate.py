"""Evaluate phase: summary metrics, plots and the final table from the training records.

Average accuracy: mean over tasks of the accuracy after the last training task (all classes
seen). Forgetting (class-incremental): mean over earlier tasks of the drop from their best
accuracy to their final accuracy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List

from kvb_dist.run import checkpoint
from kvb_dist.run.builders import stream_name

logger = logging.getLogger(__name__)


def summarize(record: Dict) -> Dict:
    matrix: List[List[float]] = record["accuracy"]
    final = matrix[-1]
    summary = {"average_accuracy": sum(final) / len(final), "final_accuracy_per_task": final}
    if record["setting"] == "class_incremental" and len(matrix) > 1:
        drops = [max(row[j] for row in matrix[:-1]) - final[j] for j in range(len(matrix) - 1)]
        summary["forgetting"] = sum(drops) / len(drops)
    if "unused_keys" in record:
        summary["unused_keys"] = record["unused_keys"]
    return summary


def plot_accuracy_matrix(record: Dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = record["accuracy"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(matrix[0]), 1.0 + 0.6 * len(matrix)))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black", fontsize=8)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training task")
    ax.set_title(f"{record['learner']} ({record['setting']})")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_key_usage(usage: Dict[str, List[float]], path: Path, title: str) -> Path:
    """usage: train.key_usage_histogram's pairs per power-of-two bin of fetch counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    labels = ["0"] + [f"{int(e)}" if e < 2 else f"{int(e)}-{int(2 * e - 1)}" for e in usage["lower_edges"][1:]]
    ax.bar(range(len(labels)), usage["pairs"], log=True)
    ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
    ax.set_xlabel("times a pair was fetched during training")
    ax.set_ylabel("pairs")
    unused = usage["pairs"][0] / max(sum(usage["pairs"]), 1)
    ax.set_title(f"{title}: {unused:.1%} of pairs unused")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_table(results: Dict[str, Dict[str, Dict]]) -> str:
    """One line per learner and setting: average accuracy after the last task, and forgetting
    (class-incremental with more than one task; "-" where it does not apply)."""
    width = max([len("learner")] + [len(learner) for learner in results]) + 2
    setting_width = max([len("setting")] + [len(s) for by_setting in results.values() for s in by_setting]) + 2
    lines = [f"{'learner':<{width}}{'setting':<{setting_width}}{'accuracy':>10}{'forgetting':>12}"]
    for learner, by_setting in results.items():
        for setting, metrics in sorted(by_setting.items()):
            forgetting = f"{metrics['forgetting']:.3f}" if "forgetting" in metrics else "-"
            lines.append(f"{learner:<{width}}{setting:<{setting_width}}{metrics['average_accuracy']:>10.3f}{forgetting:>12}")
    return "\n".join(lines)


def accuracy_table_rows(matrix: List[List[float]]) -> List[List]:
    """Rows of the accuracy matrix as a wandb table: the training task, then accuracy per evaluated task."""
    return [[i, *row] for i, row in enumerate(matrix)]


def run(ctx) -> Dict:
    """Reads every stream's record; rank 0 writes results.json and the plots; returns the summary."""
    config = ctx.config
    results: Dict[str, Dict[str, Dict]] = {}
    matrices: Dict[str, List[List[float]]] = {}
    images = {}
    plots = ctx.path("plots")
    for learner in config.train.learners:
        for setting in config.train.settings:
            path = checkpoint.record_path(ctx.path("checkpoints"), stream_name(setting, learner))
            saved = ctx.layout.decided_on_rank0(lambda: checkpoint.load(path))
            if saved is None or not saved["done"]:
                raise ValueError(f"no finished training for {setting} / {learner}: run the train phase first")
            record = saved["record"]
            results.setdefault(learner, {})[setting] = summarize(record)
            matrices[f"accuracy_matrix/{setting}/{learner}"] = record["accuracy"]
            if ctx.is_main:
                plots.mkdir(parents=True, exist_ok=True)
                images[f"plots/accuracy_{setting}_{learner}"] = plot_accuracy_matrix(
                    record, plots / f"accuracy_{setting}_{learner}.png"
                )
                if "key_usage" in record:
                    images[f"plots/key_usage_{setting}"] = plot_key_usage(
                        record["key_usage"], plots / f"key_usage_{setting}.png", f"kvb ({setting})"
                    )
    init_record = ctx.layout.decided_on_rank0(lambda: checkpoint.load(checkpoint.record_path(ctx.path("checkpoints"), "initialize")))
    skipped = {"init": (init_record or {}).get("samples_skipped", 0), **record.get("samples_skipped", {})}
    summary = {"results": results, "table": format_table(results), "plots": str(plots), "samples_skipped": skipped}
    if ctx.is_main:
        ctx.path("results.json").write_text(json.dumps(summary, indent=2))
        flat = {
            f"final/{setting}/{learner}/{name}": value
            for learner, by_setting in results.items()
            for setting, metrics in by_setting.items()
            for name, value in metrics.items()
            if isinstance(value, float)
        }
        ctx.tracker.log(flat)
        for name, matrix in matrices.items():
            columns = ["after task"] + [f"task {j}" for j in range(len(matrix[0]))]
            ctx.tracker.log_table(name, columns, accuracy_table_rows(matrix))
        ctx.tracker.log_images(images)
        files = {"results.json": ctx.path("results.json")}
        files.update({f"plots/{path.name}": path for path in images.values()})
        ctx.tracker.log_artifact("results", "results", files)
    return summary
