"""Tiny model factories for the CLI tests (``--model tests/integrations/tiny_models.py:tiny_mlp``)."""

import os

from valfree.models import mlp


def tiny_mlp():
    """With VALFREE_TEST_LOAD_LOG set, every checkpoint loaded into the model appends this process's
    RANK to that file, so a test can see which rank scored what."""
    model = mlp(num_classes=3, in_size=4, width=8, depth=1)
    log = os.environ.get("VALFREE_TEST_LOAD_LOG")
    if log:
        def note_rank(module, incompatible_keys):
            with open(log, "a") as fh:
                fh.write(os.environ.get("RANK", "-") + "\n")

        model.register_load_state_dict_post_hook(note_rank)
    return model
