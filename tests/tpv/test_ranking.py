"""Ranking candidates and the argmax-TPV point of a trajectory."""

import torch

import valfree
from valfree.tpv import Isotropic, rank_models, tpv_trajectory

from . import zoo


def _scaled(scale):
    model = zoo.fm_mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model.eval()


def test_trajectory_reports_the_interior_peak():
    x = zoo.inputs_for("mlp", 64)
    scales = [0.3, 0.6, 1.5, 0.8, 0.4]
    traj = tpv_trajectory([(10 * i, (lambda s=s: _scaled(s))) for i, s in enumerate(scales)], x, "iso:0.01", probes=4)
    assert traj.steps == [0, 10, 20, 30, 40]
    assert traj.peak_step == 20 and traj.peak_interior
    assert len(traj.as_rows()) == 5 and all(e.stderr > 0 for e in traj.estimates)
    monotone = tpv_trajectory([(i, _scaled(s)) for i, s in enumerate([0.2, 0.5, 1.0])], x, "iso:0.01", probes=4)
    assert monotone.peak_step == 2 and not monotone.peak_interior


def test_rank_models_orders_by_value_and_flags_unresolved_neighbours():
    x = zoo.inputs_for("mlp", 64)
    candidates = {"small": _scaled(0.5), "big": _scaled(2.0), "twin_a": _scaled(1.0), "twin_b": _scaled(1.0)}
    ranked = rank_models(candidates, x, Isotropic(0.01), probes=4)
    names = [r.name for r in ranked]
    assert names[0] == "small" and names[-1] == "big" and set(names[1:3]) == {"twin_a", "twin_b"}
    assert [r.rank for r in ranked] == [1, 2, 3, 4]
    assert ranked[1].tied_with_next and not ranked[0].tied_with_next and not ranked[2].tied_with_next
    values = [r.estimate.value for r in ranked]
    assert values == sorted(values)
    # The same inputs and seed give every candidate the same probes: identical twins get identical values.
    assert ranked[1].estimate.value == ranked[2].estimate.value
    assert valfree.tpv(candidates["small"], x, "iso:0.01", probes=4).value == ranked[0].estimate.value
