"""Run train_and_evaluate in a fresh process (used by the tests: multi-device and kill/resume).

usage: python _train_subprocess.py CONFIG_JSON WORKDIR [BATCH_DELAY_SECONDS]
A positive delay slows every batch the data pipeline produces, so that a test can kill the
process mid-training after its first checkpoint; it changes timing only, never the batches.
"""

import json
import sys
import time

from imat.train_jax.config import TrainConfig
from imat.train_jax.train import train_and_evaluate

if __name__ == "__main__":
    config = TrainConfig.from_json(sys.argv[1])
    delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    if delay > 0:
        from imat.data_tools import pipelines

        original = pipelines.ClassificationSource.batch

        def slow_batch(self, step, _original=original):
            time.sleep(delay)
            return _original(self, step)

        pipelines.ClassificationSource.batch = slow_batch
    result = train_and_evaluate(config, sys.argv[2])
    import jax

    print("RESULT " + json.dumps({"devices": jax.device_count(), **result}))
