"""The grid of the evidence benchmark: families, regimes, seeds, and the data splits they share.

Every size here is chosen to fit 36 runs into about an hour on 2 idle CPU cores; docs/benchmarks.md
states them. The held-out pool (images never trained on) supplies the small labelled validation sets
and the unlabeled probe batch; the test set is read for evaluation only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "benchmarks" / "cache" / "evidence"


def cache_for(grid: str) -> Path:
    """The full grid's runs live in CACHE, the quick grid's apart (same run names, different specs)."""
    return CACHE if grid == "full" else CACHE / grid
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"


@dataclass(frozen=True)
class Regime:
    """How a run is trained. ``schedule`` is "cosine" (decays to 0) or "constant"."""

    name: str
    train_size: int
    epochs: int
    label_noise: float = 0.0
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    description: str = ""


@dataclass(frozen=True)
class Family:
    """A model family: the valfree.models factory, its size arguments and its optimiser."""

    name: str
    factory: str
    kwargs: dict = field(default_factory=dict)
    optimizer: str = "sgd"  # "sgd" (momentum 0.9, nesterov) or "adamw"
    lr: float = 0.05

    def build(self, in_size: int):
        from valfree.models import FAMILIES

        return FAMILIES[self.factory](num_classes=10, in_size=in_size, **self.kwargs)


@dataclass(frozen=True)
class RunSpec:
    """One trajectory: a family trained in a regime from a seed, saving ``checkpoints`` state dicts."""

    family: Family
    regime: Regime
    seed: int
    data: str = "fashion-mnist"
    checkpoints: int = 30
    batch_size: int = 128
    # Training evaluates each checkpoint on the first 2000 test images (evaluating more there did not
    # fit the CPU budget of a shared machine); full_test.py adds the rest of the split afterwards, from
    # the cached checkpoints, and the report uses the whole split. Part of the run's cache key.
    test_size: int | None = 2000  # None: the whole split
    held_out: int = 10000  # images of the train split reserved as the held-out pool
    train_eval_size: int = 250  # fixed training subset on which the training loss is recorded
    val_sizes: tuple[int, ...] = (100, 500, 1000)
    probe_size: int = 256  # the probe batch, and the unlabeled held-out batch

    @property
    def name(self) -> str:
        return f"{self.family.name}-{self.regime.name}-s{self.seed}"

    def key(self) -> str:
        """A hash of everything that determines the trajectory: a changed spec retrains the run."""
        blob = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def as_dict(self) -> dict:
        return asdict(self)


# Model sizes: the valfree.models defaults (the CNN is the demo's). Measured on an idle core of the
# 2-core machine, a 128-image training step takes 112 ms (CNN, 57k parameters), 135 ms (ResNet, 78k),
# 21 ms (ViT, 72k) and 2 ms (MLP, 269k).
FAMILIES = {
    "mlp": Family("mlp", "mlp", {"width": 256, "depth": 2}, "sgd", 0.05),
    "cnn": Family("cnn", "cnn", {"width": 32}, "sgd", 0.05),
    "resnet": Family("resnet", "resnet", {"width": 16}, "sgd", 0.05),
    "vit": Family("vit", "vit", {"dim": 64, "depth": 2}, "adamw", 2e-3),
}

REGIMES = {
    "clean": Regime("clean", 10000, 5, 0.0, 5e-4, "cosine", "10k images, SGD/AdamW with weight decay, cosine to zero"),
    # 40 epochs: long enough for the models to start fitting the flipped labels, where test accuracy
    # peaks and then falls (in 10 epochs none did: training accuracy on the noisy labels stayed at 61-72 %).
    "noisy": Regime("noisy", 10000, 40, 0.3, 0.0, "cosine", "10k images, 30 % symmetric label noise, no weight decay, cosine, 40 epochs"),
    "small": Regime("small", 5000, 20, 0.0, 5e-4, "constant", "5k images, constant learning rate, long"),
}

SEEDS = (0, 1, 2)


def full_grid() -> list[RunSpec]:
    # Seed by seed, slowest families first, so that a partial grid holds whole seeds.
    order = ("resnet", "cnn", "vit", "mlp")
    return [RunSpec(FAMILIES[f], REGIMES[r], s) for s in SEEDS for f in order for r in REGIMES]


def quick_grid() -> list[RunSpec]:
    """One seed of two families (MLP and ViT, the cheap ones), all three regimes, shortened."""
    out = []
    for r in REGIMES.values():
        short = replace(r, epochs=max(3, r.epochs // 3), train_size=min(r.train_size, 5000))
        for f in ("mlp", "vit"):
            out.append(RunSpec(FAMILIES[f], short, 0, checkpoints=15, test_size=2000))
    return out


def tiny_grid(data: str = "digits") -> list[RunSpec]:
    """Seconds-sized runs on scikit-learn digits for the pipeline test."""
    tiny_mlp = Family("mlp", "mlp", {"width": 32, "depth": 1}, "sgd", 0.05)
    tiny_vit = Family("vit", "vit", {"dim": 16, "depth": 1}, "adamw", 3e-3)
    regimes = [Regime("clean", 600, 4), Regime("noisy", 600, 6, 0.3, 0.0)]
    common = dict(data=data, checkpoints=8, held_out=400, train_eval_size=300, val_sizes=(50, 100), probe_size=64, batch_size=32)
    runs = [RunSpec(tiny_mlp, r, s, **common) for r in regimes for s in (0, 1)]
    return runs + [RunSpec(tiny_vit, regimes[0], 0, **common)]
