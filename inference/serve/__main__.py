"""python -m inference.serve --config configs/serve/<job>.yaml [key=value ...]   (the online service; app.py)"""

import sys

from data_prep.schema import PreparedDataError
from lmrec_common.config import ConfigError, cli_args, dump_yaml, load_config
from lmrec_common.log import user_errors
from lmrec_common.models import ModelPathError, RemoteCodeError
from inference.run import InferenceError
from inference.serve.config import ServeConfig
from inference.serve.engine import ServeError
from train.export import ExportIntegrityError


def main() -> None:
    import torch
    import uvicorn

    from inference.serve.app import Service
    from inference.serve.engine import Engine

    path, overrides = cli_args(sys.argv[1:], ServeConfig, "python -m inference.serve")
    cfg = load_config(ServeConfig, path, overrides).checked()
    print(f"[serve] config {path or '(defaults)'}:\n{dump_yaml(cfg)}", end="", flush=True)
    torch.set_num_threads(cfg.num_threads)
    engine = Engine.load(cfg, log=lambda s: print(s, flush=True))  # before the port opens: /healthz is ok once it answers
    service = Service(cfg, engine, log=lambda s: print(s, flush=True))
    print(f"[serve] listening on http://{cfg.host}:{cfg.port} (POST /v1/recommend, /v1/search; GET /healthz, /v1/model, "
          "/metrics)", flush=True)
    # uvicorn handles SIGINT/SIGTERM: stop accepting, finish the requests in flight, then exit
    uvicorn.run(service.app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=cfg.access_log,
                lifespan="on", timeout_graceful_shutdown=30)


if __name__ == "__main__":
    # expected errors (bad config, nothing published to follow, a damaged final/): one line, exit 2
    user_errors(main, (ServeError, InferenceError, ExportIntegrityError, PreparedDataError, ConfigError, ModelPathError,
                       RemoteCodeError))
