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
    """The full (base) and extended grids' runs live in CACHE (their run names differ), the quick
    grid's apart (same run names as the full grid, different specs)."""
    return CACHE if grid in ("full", "extended", "all") else CACHE / grid
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"


@dataclass(frozen=True)
class Regime:
    """How a run is trained.

    - ``schedule``: "cosine" (decays to 0), "constant", or "step" (x0.1 at 50 % and 75 % of the steps).
    - ``noise_type``: "symmetric" (a flipped label goes to a uniformly drawn other class) or
      "asymmetric" (class c goes to (c + 1) % 10); exactly ``round(label_noise * n)`` labels are flipped.
    - ``optimizer``/``lr``: override the family's optimiser ("sgd", "adam", "adamw") and learning rate.
    - ``batchnorm``: the MLP family is built with BatchNorm after each hidden layer (the other
      families are left as they are: the CNN and ResNet already have BatchNorm).
    """

    name: str
    train_size: int
    epochs: int
    label_noise: float = 0.0
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    description: str = ""
    noise_type: str = "symmetric"
    optimizer: str | None = None
    lr: float | None = None
    batchnorm: bool = False


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

        from .models import LOCAL_FACTORIES

        factory = LOCAL_FACTORIES.get(self.factory) or FAMILIES[self.factory]
        return factory(num_classes=10, in_size=in_size, **self.kwargs)


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
    # Predicted classes on min(pred_subset, n_train) fixed training images (a superset of the probe
    # batch) are recorded at every checkpoint in predictions.npz: prediction changes (Label Wave).
    pred_subset: int = 4096
    # Signal groups computed for this run (None: all of signals.GROUPS). Not part of the key: it says
    # what is computed from the checkpoints, not how they were trained.
    signal_groups: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return f"{self.family.name}-{self.regime.name}-s{self.seed}"

    def key(self) -> str:
        """A hash of everything that determines the trajectory: a changed spec retrains the run."""
        spec = asdict(self)
        spec.pop("signal_groups")
        blob = json.dumps(spec, sort_keys=True, default=str)
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

# The extended grid: regimes where memorisation of wrong labels comes at different times and
# speeds, and clean regimes where prediction changes oscillate. 5k training images so that the grid
# trains in about half an hour on 2 cores; the noisy ones run 30 epochs, long enough to memorise.
_N = "5k images, "
EXTENDED_REGIMES = {
    "noisy-constant": Regime("noisy-constant", 5000, 30, 0.3, 0.0, "constant", _N + "30 % symmetric noise, constant learning rate, 30 epochs"),
    "noisy-adam": Regime("noisy-adam", 5000, 30, 0.3, 0.0, "cosine", _N + "30 % symmetric noise, Adam (lr 1e-3) for every family, cosine, 30 epochs", optimizer="adam", lr=1e-3),
    "noisy-step": Regime("noisy-step", 5000, 30, 0.3, 0.0, "step", _N + "30 % symmetric noise, step schedule (x0.1 at 50 % and 75 %), 30 epochs"),
    "noisy20": Regime("noisy20", 5000, 30, 0.2, 0.0, "cosine", _N + "20 % symmetric noise, cosine, 30 epochs"),
    "noisy60": Regime("noisy60", 5000, 30, 0.6, 0.0, "cosine", _N + "60 % symmetric noise, cosine, 30 epochs"),
    "asym40": Regime("asym40", 5000, 30, 0.4, 0.0, "cosine", _N + "40 % asymmetric noise (class c -> c+1), cosine, 30 epochs", noise_type="asymmetric"),
    "tiny": Regime("tiny", 1000, 100, 0.3, 0.0, "constant", "1k images, 30 % symmetric noise, constant learning rate, 100 epochs (memorises within a few checkpoints)"),
    "clean-bn-highlr": Regime("clean-bn-highlr", 5000, 15, 0.0, 5e-4, "constant", _N + "clean, BatchNorm model, SGD lr 0.2 constant, 15 epochs", optimizer="sgd", lr=0.2, batchnorm=True),
    "clean-step": Regime("clean-step", 5000, 15, 0.0, 5e-4, "step", _N + "clean, step schedule (x0.1 at 50 % and 75 %), 15 epochs"),
}
# Families and seeds of the extended grid; the ViT (LayerNorm, no BatchNorm) sits out the BatchNorm regime.
EXTENDED_RUNS = {"mlp": (0, 1, 2), "vit": (0, 1, 2), "cnn": (0,)}
EXTENDED_SKIP = {("vit", "clean-bn-highlr")}
# Signal groups of the extended runs: the probe (and its batch-size study) and the pseudo-label probe;
# Tr(H_eff) and WeightWatcher (the measured remedies that failed, and the costly ones) only on the base grid.
EXTENDED_SIGNALS = ("probe", "pseudo", "probe_size")


def regime_family(family: Family, regime: Regime) -> Family:
    """The family as the regime trains it: the BatchNorm MLP where the regime asks for BatchNorm."""
    if regime.batchnorm and family.factory == "mlp":
        return replace(family, factory="mlp_bn")
    return family


def full_grid() -> list[RunSpec]:
    # Seed by seed, slowest families first, so that a partial grid holds whole seeds.
    order = ("resnet", "cnn", "vit", "mlp")
    return [RunSpec(FAMILIES[f], REGIMES[r], s) for s in SEEDS for f in order for r in REGIMES]


def extended_grid() -> list[RunSpec]:
    """The extended regimes: MLP and ViT on seeds 0-2, the CNN on seed 0 (seed by seed, CNN first)."""
    out = []
    for s in SEEDS:
        for f in ("cnn", "vit", "mlp"):
            if s not in EXTENDED_RUNS[f]:
                continue
            for r in EXTENDED_REGIMES.values():
                if (f, r.name) in EXTENDED_SKIP:
                    continue
                out.append(RunSpec(regime_family(FAMILIES[f], r), r, s, signal_groups=EXTENDED_SIGNALS))
    return out


def all_grid() -> list[RunSpec]:
    """Both grids, seed by seed (base runs of a seed, then its extended runs), so that a partial
    grid holds whole seeds of both."""
    base, ext = full_grid(), extended_grid()
    return [spec for s in SEEDS for spec in base + ext if spec.seed == s]


def quick_grid() -> list[RunSpec]:
    """One seed of two families (MLP and ViT, the cheap ones), the three base regimes and three
    extended ones (step schedule, asymmetric noise, BatchNorm at a high learning rate), shortened."""
    out = []
    for r in REGIMES.values():
        short = replace(r, epochs=max(3, r.epochs // 3), train_size=min(r.train_size, 5000))
        for f in ("mlp", "vit"):
            out.append(RunSpec(FAMILIES[f], short, 0, checkpoints=15, test_size=2000))
    for name in ("noisy-step", "asym40", "clean-bn-highlr"):
        r = EXTENDED_REGIMES[name]
        short = replace(r, epochs=max(3, r.epochs // 3), train_size=min(r.train_size, 3000))
        for f in ("mlp", "vit"):
            if (f, name) in EXTENDED_SKIP:
                continue
            out.append(RunSpec(regime_family(FAMILIES[f], short), short, 0, checkpoints=15, test_size=2000, signal_groups=EXTENDED_SIGNALS))
    return out


def tiny_grid(data: str = "digits") -> list[RunSpec]:
    """Seconds-sized runs on scikit-learn digits for the pipeline test."""
    tiny_mlp = Family("mlp", "mlp", {"width": 32, "depth": 1}, "sgd", 0.05)
    tiny_vit = Family("vit", "vit", {"dim": 16, "depth": 1}, "adamw", 3e-3)
    regimes = [Regime("clean", 600, 4), Regime("noisy", 600, 6, 0.3, 0.0)]
    common = dict(data=data, checkpoints=8, held_out=400, train_eval_size=300, val_sizes=(50, 100), probe_size=64, batch_size=32)
    runs = [RunSpec(tiny_mlp, r, s, **common) for r in regimes for s in (0, 1)]
    # The extended regimes' machinery: asymmetric noise with a step schedule and Adam; BatchNorm MLP at a
    # high constant learning rate; a prediction subset smaller than the training set.
    asym = Regime("asym-step", 600, 6, 0.3, 0.0, "step", noise_type="asymmetric", optimizer="adam", lr=3e-3)
    bn = Regime("bn-highlr", 600, 4, 0.0, 5e-4, "constant", optimizer="sgd", lr=0.2, batchnorm=True)
    return runs + [
        RunSpec(tiny_vit, regimes[0], 0, **common),
        RunSpec(tiny_mlp, asym, 0, **dict(common, pred_subset=256), signal_groups=("probe",)),
        RunSpec(regime_family(tiny_mlp, bn), bn, 0, **common, signal_groups=("probe",)),
    ]
