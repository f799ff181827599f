"""``python -m benchmarks.evidence COMMAND``.

- ``train [--grid full|extended|all|quick] [--workers N]``: train the grid's runs, compute their signals, and evaluate every
  checkpoint on the whole test split (all cached).
- ``report [--grid full|quick]``: selectors, metrics, JSON results and the markdown report, from the cache.
- ``run`` = ``train --grid all`` (base and extended), ``sweep``, ``perf``, then ``report``; ``quick`` = the same for the quick grid.
- ``sweep``: TPV train vs test on a teacher-student task, and the regularisation sweep (the U-shape).
- ``perf``: scoring a folder of checkpoints against a full validation pass on each.
"""

from __future__ import annotations

import argparse
import sys
import time

from .config import all_grid, cache_for, extended_grid, full_grid, quick_grid


def grid(name: str):
    return {"full": full_grid, "quick": quick_grid, "extended": extended_grid, "all": all_grid}[name]()


def cmd_train(args) -> int:
    from .runner import run_grid

    specs = grid(args.grid)
    if args.runs:  # only these runs (names as in the report: family-regime-sSEED)
        unknown = sorted(set(args.runs) - {s.name for s in specs})
        if unknown:
            print(f"not in the {args.grid} grid: {', '.join(unknown)}", file=sys.stderr)
            return 2
        specs = [s for s in specs if s.name in set(args.runs)]
    if args.reverse:  # a second runner on the same cache works from the other end; locks keep them apart
        specs = specs[::-1]
    if args.coverage:  # seed 0 of everything, then the cheap families' other seeds, the costly ones last
        cost = {"mlp": 0, "vit": 1, "cnn": 2, "resnet": 3}
        first = min(s.seed for s in specs)
        specs = sorted(specs, key=lambda s: (s.seed != first, cost[s.family.name] if s.seed != first else 0, s.seed))
    if args.cheap_first:  # by family cost (MLP, ViT, CNN, ResNet), seed by seed within a family
        cost = {"mlp": 0, "vit": 1, "cnn": 2, "resnet": 3}
        specs = sorted(specs, key=lambda s: (cost[s.family.name], s.seed))
    if args.resnet_last:  # the costliest family's last seed goes last: if time runs out, that is what is missing
        last_seed = max(s.seed for s in specs)
        specs = sorted(specs, key=lambda s: s.family.name == "resnet" and s.seed == last_seed)
    t0 = time.perf_counter()
    print(f"training and scoring {len(specs)} runs with {args.workers} worker(s)", flush=True)
    failed = run_grid(specs, cache=cache_for(args.grid), workers=args.workers)
    print(f"done in {time.perf_counter() - t0:.0f}s; failed: {failed or 'none'}", flush=True)
    return 1 if failed else 0


def cmd_report(args) -> int:
    from .report import build_report

    build_report(args.grid)
    return 0


def cmd_sweep(args) -> int:
    from .teacher_student import run_teacher_student
    from .tpv_sweep import run_sweep

    run_teacher_student(quick=args.grid == "quick")
    run_sweep(quick=args.grid == "quick")
    return 0


def cmd_perf(args) -> int:
    from .perf import run_perf

    run_perf(quick=args.grid == "quick")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evidence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train", "report", "run", "quick", "sweep", "perf"])
    parser.add_argument("--grid", choices=["full", "quick", "extended", "all"], default=None,
                        help="full: the base grid (36 runs); extended: the memorisation regimes; all: both (one cache)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--runs", nargs="+", metavar="NAME", help="train only these runs, e.g. cnn-noisy-s0 (the report's run names)")
    parser.add_argument("--reverse", action="store_true", help="train the grid in reverse order (for a second runner)")
    parser.add_argument("--coverage", action="store_true", help="seed 0 first, then cheap families' other seeds, costly ones last")
    parser.add_argument("--cheap-first", action="store_true", help="cheap families first (MLP, ViT, CNN, ResNet), so that a partial grid misses costly runs")
    parser.add_argument("--resnet-last", action="store_true", help="train the ResNet runs of the last seed after all others")
    args = parser.parse_args(argv)
    if args.command in ("run", "quick"):
        args.grid = args.grid or ("quick" if args.command == "quick" else "full")
        # The full report covers the base and the extended grid: train both (one cache).
        rc = cmd_train(argparse.Namespace(**{**vars(args), "grid": "all" if args.grid == "full" else args.grid}))
        rc |= cmd_sweep(args)
        rc |= cmd_perf(args)
        return rc | cmd_report(args)
    args.grid = args.grid or "full"
    return {"train": cmd_train, "report": cmd_report, "sweep": cmd_sweep, "perf": cmd_perf}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
