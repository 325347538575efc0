# twistd -ny worker.tac: the service of `twistd rexnet-worker`, from a .tac file.
# The options are those of rexnet-worker(8), taken from $REXNET_WORKER_OPTIONS
# (default: --config /etc/rexnet/config.toml).
import os
import shlex

from twisted.application.service import Application
from twisted.python import usage

from rexnet.worker.tap import Options, makeService

options = Options()
try:
    options.parseOptions(shlex.split(
        os.environ.get("REXNET_WORKER_OPTIONS", "--config /etc/rexnet/config.toml")))
except usage.UsageError as e:
    raise SystemExit(f"worker.tac: {e}") from None
application = Application("rexnet-worker")
makeService(options).setServiceParent(application)
