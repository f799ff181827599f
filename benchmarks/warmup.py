"""The early-stopping warm-up, measured: the online stop of the training integrations replayed on the
committed evidence trajectories, for warm-ups fixed up front.

    python benchmarks/warmup.py        # about 10 s; writes benchmarks/results/warmup.json, prints the table

What is replayed. Each trajectory under ``curves`` in ``benchmarks/results/evidence_all.json`` (71
runs of 30 checks: MLP, ViT and ResNet, clean and noisy-label regimes) is fed one check at a time to
the :class:`~valfree.integrations.tracking.ScoreTracker` that ``valfree.Monitor`` and the Lightning
and Hugging Face callbacks share, which holds the core :class:`~valfree.selection.EarlyStopping` and
the selection layer's :class:`~valfree.selection.online.RuleTracker`. The columns are the ones a
callback records at a check: the probe (``hg_grad_norm``), ``pred_change``, ``label_agreement`` and
the subset size of the run. The run's length is known (``expected_checks=30``, as for a callback that
knows its number of steps), the patience is ``DEFAULT_PATIENCE`` and every other option is the
default. The run stops at the first check after which ``should_stop()`` is true, as a training loop
that breaks on it would; the checkpoint it restores is the tracker's choice at that check
(``ScoreTracker.best()``, what ``load_best()`` loads). "No early stopping" is the same tracker with
``patience=None`` fed all 30 checks.

Warm-ups: none (0), 0.1, 0.2 and 0.3 of the expected checks, and a count of 3 checks. Rules: the
default (``guarded``) and ``probe``. A run is noisy when its regime's name contains ``noisy``,
``asym`` or ``tiny`` (they train on wrong labels), clean otherwise. Per warm-up, rule and
clean/noisy:

- premature: the share of runs that stopped more than 3 checks (a tenth of the run) before the
  checkpoint of best test accuracy;
- gap: the mean, over runs, of the best test accuracy of the run minus the test accuracy of the
  restored checkpoint, in points;
- checks: the mean number of checks the run took (of 30), i.e. the compute early stopping saved.

Decision rule (written down and committed before any number was computed):

1. A warm-up passes when, for both rules, (a) its clean mean gap is within 0.1 points of the clean
   mean gap without early stopping, and (b) its noisy mean gap is no more than 0.25 points above the
   noisy mean gap without early stopping.
2. The candidates for the default are none (0) and the fractions 0.1, 0.2 and 0.3. The count of 3
   checks is reported for comparison only: a count does not scale with the run's length (on these
   30-check runs it equals 0.1, and it is what any fraction below 0.75 amounts to when the length is
   unknown, see ``RuleTracker.warmup_checks``).
3. The default is the smallest candidate that passes, the least warm-up that costs no accuracy, so
   that early stopping saves the most compute. It replaces 0.2 only if, with the default rule, it
   saves at least 0.5 checks per run on average over all runs: equal outcomes are no reason to change
   a default, and a longer warm-up is the safer one on runs unlike these.
4. If no candidate passes, 0.2 stays only if no other candidate has a smaller clean mean gap with
   the default rule; otherwise that candidate becomes the default, and the docs say that early
   stopping costs accuracy on these runs.
"""
