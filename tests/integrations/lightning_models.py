"""A LightningModule for the Lightning tests, at module level so that ddp_spawn can pickle it.

Importing this module imports Lightning (seconds); the tests import it inside the test functions.
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from valfree.models import mlp


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.net = mlp(num_classes=4, in_size=8, width=16, depth=1)
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class ReportState(pl.Callback):
    """Writes each rank's view of the valfree callbacks at the end of fit (ddp_spawn keeps them in the workers)."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        import json
        import os

        states = {type(cb).__name__: cb.state_dict() for cb in trainer.callbacks if hasattr(cb, "tracker")}
        states["global_step"] = trainer.global_step
        states["should_stop"] = trainer.should_stop
        with open(os.path.join(self.folder, f"rank{trainer.global_rank}.json"), "w") as fh:
            json.dump(states, fh)
