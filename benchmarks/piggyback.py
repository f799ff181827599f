"""Prediction changes piggybacked on the training forward, or measured on a fixed subset: does the
choice of the selection rules change?

    nice -n 10 python benchmarks/piggyback.py                 # every run (resumable); writes the JSON
    nice -n 10 python benchmarks/piggyback.py --families mlp  # only the MLP runs (each call adds to the JSON)

Real training runs: ``valfree.models.mlp()`` and ``valfree.models.cnn(width=16)`` (BatchNorm) on
5000 Fashion-MNIST training images, with clean labels and with 30 % symmetric label noise (exactly
that share of labels replaced by another class), 3 seeds, 25 epochs of SGD (lr 0.05, Nesterov
momentum 0.9, constant rate, batch 128, no weight decay), one thread. Two ``valfree.Monitor``s watch
the same model in the same run, one check per epoch:

- **fixed**: ``Monitor(model, train_data=train_set, every=steps_per_epoch, total_steps=...)`` fed
  ``step(step, batch=(x, y))``: at each check the model predicts the seeded 2048-image training subset
  in eval mode (the default);
- **piggyback**: the same Monitor fed ``step(step, batch=(x, y), sample_ids=ids, output=logits)`` at
  every training step: each sample's predicted class in the training forward is compared with the
  one it had when it was last seen (a check per epoch: every sample once).

Both probe the same fixed batch (the Monitor's seeded draw), so the two differ only in how
``pred_change`` and ``label_agreement`` are measured. After each check the model's test accuracy is
measured on 5000 test images (evaluation only; no rule reads it).

Per run and mode: the checkpoint each rule chooses over the whole run (the default rule ``guarded``,
and ``label-wave``, which reads prediction changes alone), and the one the online stop restores
(the default rule with patience 10 and the default warm-up, replayed by ``benchmarks/warmup.py``'s
``replay``), each with its gap to the run's best test accuracy in points; and the position of the
Label Wave point (the PC minimum) in each mode.

Recommendation rule (written down and committed before any run):

- Per regime (family x labels), the paired difference piggyback - fixed of the default rule's gap,
  mean over seeds. Piggyback is recommended wherever batches carry sample indices if that difference
  is at most 0.5 points in every regime, both over the whole run and with the online stop; otherwise
  the docs recommend the fixed subset for the regimes where it is larger, and say by how much.
- The same difference for ``label-wave`` is reported; it bears on the recommendation for
  ``rule="label-wave"`` only (same 0.5-point threshold).
- The PC minima agree in a run when the two Label Wave points are at most one check apart; the
  share of runs where they agree and the mean distance are reported, not used to decide.
"""
