# Thin wrappers over scripts/dev.sh, which also works where make is not installed.
PY := .venv/bin/python

.PHONY: setup demo test fuzz bench bench-quick bench-probe bench-tpv bench-prune bench-evidence bench-integrations bench-score bench-beyond clean

setup:
	bash scripts/dev.sh setup

demo:
	bash scripts/dev.sh demo

test:
	bash scripts/dev.sh test

# Seeded fuzzing (docs/security.md): 2000 mutated and hostile checkpoint files (about a minute), then
# 500 command lines over every subcommand, 3 rounds of two concurrent score writers and 5 killed and
# rerun score runs (a few minutes). FUZZ_COUNT, FUZZ_CLI_COUNT and FUZZ_SEED change sizes and seed.
fuzz: setup
	nice -n 10 $(PY) -m tests.fuzz.fuzz --count $${FUZZ_COUNT:-2000} --seed $${FUZZ_SEED:-1}
	nice -n 10 $(PY) -m tests.fuzz.cli_fuzz --count $${FUZZ_CLI_COUNT:-500} --seed $${FUZZ_SEED:-1} --writers 3 --kills 5 --processes 5

bench-probe: setup
	$(PY) benchmarks/probe_speed.py

# TPV estimator cost and train-vs-test stability (docs/tpv_speed.md, docs/tpv_stability.md); about 20 min on 2 shared cores.
bench-tpv: setup
	nice -n 10 $(PY) benchmarks/tpv_speed.py
	nice -n 10 $(PY) benchmarks/tpv_stability.py

bench: bench-probe bench-tpv bench-prune bench-evidence bench-integrations bench-score

# Evidence benchmark (docs/benchmarks.md): the base grid (36 runs) and the memorisation regimes (60 runs), each
# recording predicted classes on a training subset at every checkpoint; several hours on 2 idle cores (the
# 40-epoch noisy ResNet and CNN runs dominate); cached and resumable, so a rerun only redoes what is missing. bench-quick: one seed of two families, about a minute on 2 idle cores
# (docs/benchmarks_quick.md).
bench-evidence: setup
	$(PY) -m benchmarks.evidence run --workers 2

# Overhead of the training integrations (docs/integrations.md): a few minutes on 2 shared cores.
bench-integrations: setup
	nice -n 10 $(PY) benchmarks/integration_overhead.py

# The share of `valfree score`'s time spent recording predictions (docs/guide.md): about 6 min on 2 shared cores.
bench-score: setup
	nice -n 10 $(PY) benchmarks/score_cost.py

# Beyond classification (docs/beyond.md): segmentation, detection, diffusion, two LMs, then the diffusion
# probe-batch sensitivity; about 30 min on 2 shared cores, checkpoints cached in benchmarks/cache/beyond/.
bench-beyond: setup
	nice -n 10 $(PY) -m benchmarks.beyond.run
	nice -n 10 $(PY) -m benchmarks.beyond.diffusion_probe_batch

# Pruning criteria side by side on a Fashion-MNIST CNN (docs/pruning.md): about 3 min on 2 idle cores,
# training included (cached in benchmarks/cache/). python benchmarks/prune_bench.py --quick: seconds.
bench-prune: setup
	nice -n 10 $(PY) benchmarks/prune_bench.py

bench-quick: setup
	$(PY) -m benchmarks.evidence quick

clean:
	rm -rf .venv valfree-demo
