"""python -m data_prep --config configs/data_prep/<job>.yaml [key=value ...]"""

import sys

from data_prep.config import DataPrepConfig
from data_prep.pipeline import run
from lmrec_common.config import cli_args, load_config

if __name__ == "__main__":
    config_path, overrides = cli_args(sys.argv[1:])
    run(load_config(DataPrepConfig, config_path, overrides))
