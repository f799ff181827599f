"""A demo run again in the same folder starts afresh: its selection sees one row per checkpoint."""

import csv

from valfree.commands.demo import clear_previous_demo, run_demo


def test_clearing_removes_only_the_demos_own_files(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    for name in ("step_000010.pt", "step_000020.pt", "mine.pt"):
        (ckpt / name).write_bytes(b"x")
    scores = tmp_path / "scores.csv"
    for name in ("scores.csv", "scores.csv.db", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "scores.csv.predictions").mkdir()
    (tmp_path / "scores.csv.predictions" / "a.npy").write_bytes(b"x")
    clear_previous_demo(ckpt, scores)
    assert sorted(p.name for p in ckpt.iterdir()) == ["mine.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "notes.txt"]


def test_a_second_demo_in_the_same_folder_scores_each_checkpoint_once(tmp_path):
    out = tmp_path / "demo"
    for _ in range(2):
        assert run_demo(str(out), data="digits", epochs=2, train_size=256, quiet=True) == 0
    with open(out / "scores.csv") as fh:
        steps = [row["step"] for row in csv.DictReader(fh)]
    checkpoints = sorted((out / "checkpoints").glob("step_*.pt"))
    assert len(steps) == len(set(steps)) == len(checkpoints) > 0
