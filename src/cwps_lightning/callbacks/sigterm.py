"""SIGTERM during a fit: the ranks stop together, without a collective in the signal handler.

Lightning (2.6) answers SIGTERM with a handler that forwards the signal to the ranks its own
launcher started and then calls ``dist.broadcast``. A handler runs wherever the main thread
is; in the middle of a backward that broadcast pairs with another rank's gradient all-reduce,
and both wait for the backend's timeout (gloo: 30 min; measured on this project's CPU DDP
runs: no progress for more than 10 min after ``kill -TERM``). And Lightning stops a rank at
an epoch's end on that rank's own flag: one rank that has the signal there while another does
not yet leaves the other waiting in its next collective (measured: a gloo "Connection closed
by peer" traceback from rank 1).

Here the handler only records the signal (and forwards it, as Lightning's does). At the end of
every training batch the ranks take the flag together (one all-reduce of a 1-element tensor,
any rank's signal counts) and, if it is set, all set Lightning's flag at once: every rank then
stops at the same point (the next batch, or the epoch's end).
"""

from __future__ import annotations

import logging

import lightning as L
import torch
import torch.distributed as dist

from .. import distributed

log = logging.getLogger(__name__)


class SigtermAtNextBatch(L.Callback):
    """Replaces the trainer's SIGTERM notifier before Lightning registers it (at every fit,
    after ``on_fit_start``); the fit then raises Lightning's SIGTERMException on every rank at
    the same batch (one process: at the epoch's end, as Lightning does). Where Lightning's
    connector has no such notifier (another version), its own handler stays."""

    def __init__(self):
        self.signalled = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signalled = False
        distributed.remember_launcher(getattr(trainer.strategy, "launcher", None))
        connector = getattr(trainer, "_signal_connector", None)
        if connector is None or not hasattr(connector, "_sigterm_notifier_fn"):
            return

        def record(signum, frame) -> None:
            log.warning("rank %d: SIGTERM: the fit stops at its next training batch, or at "
                        "its end", trainer.global_rank)
            if not self.signalled:
                # to the ranks Lightning's launcher started from this process: the first
                # fit's launcher (a later fit's started none, the ranks existed already)
                distributed.forward_signal(signum)
            self.signalled = True

        connector._sigterm_notifier_fn = record

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = self.signalled
        if distributed.active():
            flag = torch.tensor([int(stop)], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            trainer._signal_connector.received_sigterm = True
