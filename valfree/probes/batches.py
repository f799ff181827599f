"""The old home of :mod:`valfree.batches`, which moved to the package root so that every layer may use
it; this name stays so that code importing ``valfree.probes.batches`` keeps running."""

from ..batches import *  # noqa: F401,F403
