"""accelerate launch -m inference --config configs/inference/<job>.yaml run_date=YYYY-MM-DD [key=value ...]"""

import sys

from data_prep.schema import PreparedDataError
from inference.config import InferenceConfig
from inference.run import InferenceError, run
from lmrec_common.config import ConfigError, cli_args, load_config
from lmrec_common.log import exit_cleanly, print_config, quiet_deepspeed_detection, user_errors
from lmrec_common.models import ModelPathError, RemoteCodeError
from train.export import ExportIntegrityError


def main() -> None:
    quiet_deepspeed_detection()
    path, overrides = cli_args(sys.argv[1:], InferenceConfig, "accelerate launch -m inference")
    cfg = load_config(InferenceConfig, path, overrides)
    print_config("inference", path, overrides, cfg, "_config.yaml in the published run folder")
    run(cfg)
    exit_cleanly(0)  # the table is published: nothing may turn this into a failed job


if __name__ == "__main__":
    # expected errors (bad config, a damaged or missing final/, bad prepared data): one line, exit 2
    user_errors(main, (InferenceError, ExportIntegrityError, PreparedDataError, ConfigError, ModelPathError, RemoteCodeError))
