"""accelerate launch -m inference --config configs/inference/<job>.yaml run_date=YYYY-MM-DD [key=value ...]"""

import sys

from inference.config import InferenceConfig
from inference.run import run
from lmrec_common.config import cli_args, dump_yaml, load_config
from lmrec_common.log import exit_cleanly, print0

if __name__ == "__main__":
    path, overrides = cli_args(sys.argv[1:])
    cfg = load_config(InferenceConfig, path, overrides)
    print0(f"[inference] config {path or '(defaults)'}:\n{dump_yaml(cfg)}", end="")
    run(cfg)
    exit_cleanly(0)  # the table is published: nothing may turn this into a failed job
