"""Test prediction variance (TPV): how far predictions move under a parameter perturbation.

TPV = E_x E_dw ||f_{w+dw}(x) - f_w(x)||^2 ~= Tr(H_eff C): the model's geometry H_eff = E_x J^T J
against the noise covariance C (:mod:`valfree.tpv.noise`). :func:`tpv` estimates it with an error bar;
:func:`tpv_stability` checks that training inputs stand in for test inputs; :func:`rank_models` and
:func:`tpv_trajectory` use it to choose between models and along a run.
"""

from . import noise
from .estimate import TPVEstimate
from .estimators import METHODS, as_inputs, tpv
from .label_noise import label_noise_closed_form, label_noise_empirical
from .noise import Isotropic, LabelNoise, NoiseModel, Pruning, Quantization, SGDNoise, parse_noise
from .per_sample import ENGINES, row_squares
from .ranking import Ranked, Trajectory, rank_models, tpv_trajectory
from .stability import Stability, tpv_stability

__all__ = [
    "ENGINES",
    "METHODS",
    "Isotropic",
    "LabelNoise",
    "NoiseModel",
    "Pruning",
    "Quantization",
    "Ranked",
    "SGDNoise",
    "Stability",
    "TPVEstimate",
    "Trajectory",
    "as_inputs",
    "label_noise_closed_form",
    "label_noise_empirical",
    "noise",
    "parse_noise",
    "rank_models",
    "row_squares",
    "tpv",
    "tpv_stability",
    "tpv_trajectory",
]


class _CallableModule(type(noise)):
    """``valfree.tpv`` is both this package and the function: importing a submodule binds the package
    to the name ``valfree.tpv``, so the package forwards calls to :func:`tpv`."""

    def __call__(self, *args, **kwargs):
        return tpv(*args, **kwargs)


import inspect as _inspect  # noqa: E402
import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
# help(), IDEs and inspect.signature show the function's parameters, not (*args, **kwargs).
_sys.modules[__name__].__signature__ = _inspect.signature(tpv)
