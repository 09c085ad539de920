"""Training: ``train(cfg)`` / ``Trainer`` build data, model and engine and run the loop.

One concept per module (each imports only the ones above it):

- ``stop``: how a run ends early — ``Stopped`` on SIGINT / SIGTERM at an agreed step boundary (exit
  status ``STOPPED_EXIT_CODE``), ``TrainingError`` when it cannot go on.
- ``start``: before the loop — threads, the dataset (prepared by global rank 0), the vocabulary, the
  checkpoint to resume and whether it fits the config, the rank controller.
- ``loop``: ``Trainer.fit`` — get batch → step → maybe adapt ranks → maybe log / evaluate / save.
"""

from tsvd.trainer.loop import Trainer, TrainSummary, train
from tsvd.trainer.stop import STOPPED_EXIT_CODE, Stopped, TrainingError

__all__ = ["STOPPED_EXIT_CODE", "Stopped", "TrainSummary", "Trainer", "TrainingError", "train"]
