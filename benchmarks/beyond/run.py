"""Run the beyond-classification benchmarks: ``python -m benchmarks.beyond.run [TASK ...]``.

TASK is any of segmentation, detection, diffusion, diffusion-v, language, language-stdlib (default:
all, one after another). Each writes benchmarks/results/beyond_NAME.json and docs/img/beyond_NAME.png,
NAME being the task with "-" as "_"; trained checkpoints are cached under benchmarks/cache/beyond/ and
reused by a rerun with the same settings.
"""

from __future__ import annotations

import argparse
import importlib
import time

# task -> (module, keyword arguments of its run())
TASKS = {
    "segmentation": ("segmentation", {}),
    "detection": ("detection", {}),
    "diffusion": ("diffusion", {"prediction": "epsilon"}),
    "diffusion-v": ("diffusion", {"prediction": "v"}),
    "language": ("language", {"corpus": "licenses"}),
    "language-stdlib": ("language", {"corpus": "python-stdlib"}),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="*", help=f"any of {', '.join(TASKS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    for task in args.tasks or TASKS:
        t0 = time.perf_counter()
        name, kwargs = TASKS[task]
        module = importlib.import_module(f"benchmarks.beyond.{name}")
        record = module.run(log=lambda msg, task=task: print(f"[{task}] {msg}", flush=True), **kwargs)
        print(f"[{task}] done in {time.perf_counter() - t0:.0f}s", flush=True)
        print(f"[{task}] summary: {record['summary']}", flush=True)


if __name__ == "__main__":
    main()
