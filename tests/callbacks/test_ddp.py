"""Two CPU processes (gloo): SpikeGuard's decisions are the same on every rank, one event log."""

import json
import os

import pytest
import torch
from helpers import tiny_data, tiny_lm, trainer

from spikeguard.callbacks import Perturb, SpikeGuard
from spikeguard.callbacks._base import CallbackBase
from spikeguard.events import read_events
from spikeguard.perturb import Burst, Gaussian, Perturbation

BURST = 60


class Decisions(CallbackBase):
    """Writes, per rank, every step's skip decision (read after the optimizer step)."""

    def __init__(self, out_dir, guard):
        self.out_dir, self.guard, self.steps = out_dir, guard, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[trainer.global_step - 1] = bool(self.guard._skip)

    def on_train_end(self, trainer, pl_module):
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"skips": self.steps, "events": [e.step for e in self.guard.events]}, f)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_decide_alike_and_write_one_log(tmp_path):
    burst = Perturbation("transformer.h.1", Gaussian(100.0, relative=True), Burst([BURST]), direction="backward")
    guard = SpikeGuard(action="skip", log_every_n_steps=10)
    t = trainer(
        max_steps=BURST + 10, strategy="ddp_spawn", devices=2, default_root_dir=str(tmp_path),
        callbacks=[guard, Perturb(perturbations=[burst]), Decisions(str(tmp_path), guard)],
    )
    t.fit(tiny_lm(), tiny_data())
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert ranks[0]["skips"] == ranks[1]["skips"]  # identical decisions, step by step
    skipped = [int(s) for s, skip in ranks[0]["skips"].items() if skip]
    assert BURST in skipped  # (early training may have a real spike of its own, skipped alike)
    assert BURST in ranks[0]["events"]
    logs = [os.path.join(root, f) for root, _, files in os.walk(tmp_path) for f in files if f == "events.jsonl"]
    assert len(logs) == 1  # rank 0 writes, the other ranks do not
    assert [e.step for e in read_events(logs[0])] == ranks[0]["events"]
