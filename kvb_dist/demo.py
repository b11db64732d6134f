"""The paper's 2-D class-incremental toy (Fig. 2): key-value bottleneck vs linear probe vs MLP.

    python -m kvb_dist.demo                 # the paper's protocol, about 15 s on 2 cores
    python -m kvb_dist.demo --seed 3 --steps-per-task 500

After each task it prints each learner's test accuracy on the classes seen so far and on all
eight classes; at the end, a summary. See kvb_dist/toy.py for the protocol.
"""

from __future__ import annotations

import argparse
import time

import torch

from kvb_dist.toy import LEARNERS, NUM_CLASSES, TASKS, ToyConfig, iterate_protocol

LEARNER_TITLES = {"kvb": "key-value bottleneck", "linear": "linear probe", "mlp": "MLP"}


def parse_args(argv=None) -> ToyConfig:
    defaults = ToyConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps-per-task", type=int, default=defaults.steps_per_task)
    parser.add_argument("--key-init-steps", type=int, default=defaults.key_init_steps)
    parser.add_argument("--num-pairs", type=int, default=defaults.num_pairs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return ToyConfig(
        seed=args.seed,
        steps_per_task=args.steps_per_task,
        key_init_steps=args.key_init_steps,
        num_pairs=args.num_pairs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
    )


def print_task_table(record) -> None:
    seen_classes = [c for task in TASKS[: record["task"] + 1] for c in task]
    print(f"\nafter task {record['task'] + 1}/{len(TASKS)} (classes {record['classes']}):")
    print(f"  {'learner':<22} {'seen ' + str(len(seen_classes)) + ' classes':>16} {'all ' + str(NUM_CLASSES) + ' classes':>14}")
    for name in LEARNERS:
        print(f"  {LEARNER_TITLES[name]:<22} {record[name]['seen']:>16.1%} {record[name]['all']:>14.1%}")
    print(f"  unused bottleneck pairs (masked at evaluation): {record['kvb_unused_pairs']:.1%}")


def main(argv=None) -> None:
    config = parse_args(argv)
    print(
        f"toy: {NUM_CLASSES} classes in {len(TASKS)} tasks {TASKS}; bottleneck 1 codebook x {config.num_pairs} pairs, "
        f"keys 2-D fitted by {config.key_init_steps} EMA steps on uniform points, values {NUM_CLASSES}-D; "
        f"{config.steps_per_task} Adam steps per task, batch {config.batch_size}, seed {config.seed}"
    )
    start = time.perf_counter()
    records = []
    for record in iterate_protocol(config):
        print_task_table(record)
        records.append(record)
    final = records[-1]
    print(f"\nsummary, accuracy on all {NUM_CLASSES} classes after each task ({time.perf_counter() - start:.1f} s):")
    print(f"  {'learner':<22} " + " ".join(f"{'task ' + str(r['task'] + 1):>8}" for r in records))
    for name in LEARNERS:
        print(f"  {LEARNER_TITLES[name]:<22} " + " ".join(f"{r[name]['all']:>8.1%}" for r in records))
    best_baseline = max(final[name]["all"] for name in LEARNERS if name != "kvb")
    print(f"  the bottleneck ends at {final['kvb']['all']:.1%}; the best baseline at {best_baseline:.1%}")


if __name__ == "__main__":
    main()
