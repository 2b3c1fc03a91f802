"""accelerate launch [--config_file launch/accelerate/<x>.yaml] -m train --config configs/train/<job>.yaml [key=value ...]

Exit code 124 (worker; torchrun reports 1): stopped by SIGTERM/SIGUSR1 after saving a checkpoint and writing
<run>/PREEMPTED.json; relaunch the same command to resume. See train/loop.py."""

import sys

from data_prep.schema import PreparedDataError
from lmrec_common.config import ConfigError, cli_args, load_config
from lmrec_common.log import exit_cleanly, print_config, quiet_deepspeed_detection, user_errors
from lmrec_common.models import ModelPathError, RemoteCodeError
from train.checkpoint import CheckpointError
from train.config import TrainConfig, plain_config
from train.export import ExportIntegrityError, WarmStartError
from train.loop import TrainingError, run


def main() -> None:
    quiet_deepspeed_detection()
    path, overrides = cli_args(sys.argv[1:], TrainConfig, "accelerate launch -m train")
    cfg = plain_config(load_config(TrainConfig, path, overrides))
    print_config("train", path, overrides, cfg, f"{cfg.output_dir}/{cfg.run_name}/train_config.yaml")
    exit_cleanly(run(cfg))  # 0, or 124 after a signal-triggered save (requeue)


if __name__ == "__main__":
    # expected errors (bad config, bad data, a refused checkpoint or init_from): one line, exit 2
    user_errors(main, (TrainingError, CheckpointError, ExportIntegrityError, WarmStartError, PreparedDataError,
                       ConfigError, ModelPathError, RemoteCodeError))
