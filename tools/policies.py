"""``make bench-policies``: what each ``restart:`` policy costs the holders, over random nights.

Method: the soak's random nodes and jobs (``tools/soak.py``: GPUs, mapping pools, VMs, CTs, which
run) are built on the simulator; for each job, every guest gets a random backup duration
(log-normal, median 10 min), and the hook's own planner (``plan.forecast_job``, which
``pve-gpu-hook dry-run`` uses and ``tests/e2e/test_dry_run_agrees.py`` checks against the hook)
walks the job once per policy. Per holder and job it counts shutdown/boot cycles and the time
down. The lower bound: one cycle per holder per job, and down only while a guest that needs its
unit is backed up. Prints a Markdown table for BENCHMARKS.md; nothing is asserted.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.soak import build_node, make_scenario  # noqa: E402

MEDIAN_BACKUP = 600.0  # seconds
# (row label, restart policy, keep_down_max): the default, then larger limits, then no limit
POLICIES = (
    ("`after-guest`", "after-guest", 0),
    ("`job-aware`, keep_down_max 1800 (default)", "job-aware", 1800),
    ("`job-aware`, keep_down_max 3600", "job-aware", 3600),
    ("`job-aware`, keep_down_max 7200", "job-aware", 7200),
    ("`job-aware`, no limit", "job-aware", 10**9),
    ("`after-job`", "after-job", 0),
)


def nights(seed: int, scenarios: int) -> list[tuple[dict[str, object], int, float]]:
    """Per (job, holder stopped in it): each policy's forecast cost, and the lower bound
    (cycles, seconds down)."""
    from pvegpuhook.inventory import Inventory, all_guests
    from pvegpuhook.plan import forecast_job

    rng = random.Random(seed)
    rows = []
    for number in range(scenarios):
        sc = make_scenario(seed, number)
        with tempfile.TemporaryDirectory(prefix="policies-") as tmp:
            build_node(sc, Path(tmp))
            os.environ["PVE_GPU_HOOK_ROOT"] = tmp
            guests = {g.vmid: g for g in all_guests()}
            for job in sc.jobs:
                vmids = (
                    sorted(guests) if job.vmids is None else sorted(set(job.vmids) & set(guests))
                )
                inventory = Inventory()
                order, _ = inventory.job_order(
                    [guests[v] for v in vmids], stop_mode=job.mode == "stop"
                )
                durations = {v: rng.lognormvariate(math.log(MEDIAN_BACKUP), 0.8) for v in vmids}
                ha = {v for v, state in inventory.ha_states().items() if state == "started"}
                forecasts = {
                    label: forecast_job(
                        order,
                        inventory.holders(),
                        mode=job.mode,
                        protect=sc.protect,
                        restart=policy,
                        ha=ha,
                        durations=durations,
                        keep_down_max=limit,
                    )
                    for label, policy, limit in POLICIES
                }
                # after-guest is down exactly while a needing guest is backed up: the bound
                bound = forecasts[POLICIES[0][0]].holders
                for vmid, cost in bound.items():
                    per_policy = {p: f.holders.get(vmid) for p, f in forecasts.items()}
                    rows.append((per_policy, 1, cost.down_seconds))
        os.environ.pop("PVE_GPU_HOOK_ROOT", None)
    return rows


def table(rows: list[tuple[dict[str, object], int, float]]) -> str:
    def mean(values: list[float]) -> float:
        return statistics.fmean(values) if values else 0.0

    bound_cycles = mean([float(b) for _, b, _ in rows])
    bound_down = mean([d for _, _, d in rows]) / 60
    lines = [
        "| policy | cycles per holder per job | vs. lower bound | minutes down per holder per job "
        "| vs. lower bound |",
        "|---|---|---|---|---|",
    ]
    for label, _, _ in POLICIES:
        cycles = mean([float(c[label].cycles if c[label] else 0) for c, _, _ in rows])
        down = mean([c[label].down_seconds if c[label] else 0.0 for c, _, _ in rows]) / 60
        lines.append(
            f"| {label} | {cycles:.2f} | {100 * (cycles / bound_cycles - 1):+.1f} % "
            f"| {down:.1f} | {100 * (down / bound_down - 1):+.1f} % |"
        )
    lines.append(f"| lower bound | {bound_cycles:.2f} | | {bound_down:.1f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scenarios", type=int, default=400)
    args = parser.parse_args(argv)
    rows = nights(args.seed, args.scenarios)
    print(f"seed {args.seed}, {args.scenarios} random nodes, {len(rows)} (job, holder) pairs")
    print(f"backups log-normal, median {MEDIAN_BACKUP:.0f} s\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
