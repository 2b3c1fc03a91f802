"""python -m data_prep --config configs/data_prep/<job>.yaml [key=value ...]

A bad config or input is one line ``error: ...`` naming the file, key or row (exit 2); LMREC_TRACEBACK=1 adds the
traceback. A log that has not fully landed for ``expect_events_through`` is one line too, exit 3: nothing was published
(rerun once the data is there)."""

import sys

from data_prep.config import DataPrepConfig
from data_prep.pipeline import run
from data_prep.schema import DataPrepError, InputIncomplete
from lmrec_common.config import ConfigError, cli_args, load_config
from lmrec_common.log import user_errors
from lmrec_common.models import ModelPathError, RemoteCodeError


def main() -> None:
    config_path, overrides = cli_args(sys.argv[1:], DataPrepConfig, "python -m data_prep")
    run(load_config(DataPrepConfig, config_path, overrides))


if __name__ == "__main__":
    # the data is late, not a mistake of the operator's: exit 3, as the gate's "nothing to serve"
    user_errors(main, (DataPrepError, ConfigError, ModelPathError, RemoteCodeError), exit_codes={InputIncomplete: 3})
