"""SIGTERM during a fit: the ranks stop together at the next batch, without a collective in
the signal handler.

Lightning (2.6) answers SIGTERM with a handler that forwards the signal to the ranks its own
launcher started and then calls ``dist.broadcast``. A handler runs wherever the main thread
is; in the middle of a backward that broadcast pairs with another rank's gradient all-reduce,
and both wait for the backend's timeout (gloo: 30 min; measured on this project's CPU DDP
runs: no progress for more than 10 min after ``kill -TERM``). Lightning also broadcasts rank
0's flag at the start of every training batch, which is all the ranks need to stop together.
This callback gives the trainer a handler that records the signal and forwards it, as
Lightning's does, and leaves the broadcast to the batch loop.
"""

from __future__ import annotations

import logging

import lightning as L

log = logging.getLogger(__name__)


class SigtermAtNextBatch(L.Callback):
    """Replaces the trainer's SIGTERM notifier before Lightning registers it (at every fit,
    after ``on_fit_start``); the fit then raises Lightning's SIGTERMException at the next
    batch (one process: at the epoch's end) on every rank. Where Lightning's connector has no
    such notifier (another version), its own handler stays."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        connector = getattr(trainer, "_signal_connector", None)
        if connector is None or not hasattr(connector, "_sigterm_notifier_fn"):
            return

        def record(signum, frame) -> None:
            log.warning("rank %d: SIGTERM: the fit stops at the next batch",
                        trainer.global_rank)
            if not connector.received_sigterm:
                launcher = trainer.strategy.launcher
                if launcher is not None:  # (the ranks Lightning's launcher started)
                    launcher.kill(signum)
            connector.received_sigterm = True

        connector._sigterm_notifier_fn = record
