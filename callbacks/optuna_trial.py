"""A sweep trial's link to its Optuna study: the metric at every validation, and a clean stop when pruned.

``instaflow.tools.sweep`` adds it to each trial's run (``--trainer.callbacks+ callbacks.optuna_trial.OptunaTrial``)
and names the trial, its study, storage, metric and pruner in the environment (``callbacks.optuna_study``).
Without them (a run started by hand) it only takes part in the broadcast and never stops the run.

At the end of every validation, rank 0 alone talks to the storage: it reports the metric (from
``trainer.callback_metrics``) at ``trainer.global_step`` and asks the study's pruner. Its decision reaches
every rank through one broadcast, so all ranks stop at the same validation and none is left waiting in a
collective. A pruned run sets ``trainer.should_stop``: the fit ends as after its last step (checkpoint
callbacks save as usual) and the trial is marked ``pruned_step``; its worker tells the study PRUNED when the
run has ended. A trial that the study no longer holds as RUNNING (failed as stale while this run went on)
stops the run the same way.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from callbacks.optuna_study import TrialReporter


class OptunaTrial(Callback):
    """Reports the sweep's metric at every validation; stops the fit on every rank when pruned."""

    def __init__(self) -> None:
        self.reporter: TrialReporter | None = None
        self.pruned_step: int | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.is_global_zero and self.reporter is None:
            self.reporter = TrialReporter.from_env()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return  # the same test on every rank: all of them skip the broadcast together
        stop = False
        if self.reporter is not None:  # rank 0 (set up only there)
            value = trainer.callback_metrics.get(self.reporter.metric)
            if value is not None:
                stop = self.reporter.report(float(value), trainer.global_step)
        stop = bool(trainer.strategy.broadcast(stop, src=0))
        if stop:
            self.pruned_step = trainer.global_step
            trainer.should_stop = True
