# twistd -ny crat.tac: the service of `twistd crat`, from a .tac file. The options are
# those of crat(8), taken from $CRAT_OPTIONS (default: trust /etc/rexnet/crat.trust,
# append alerts to /var/log/rexnet/alerts.jsonl, dashboard on 127.0.0.1:8080).
import os
import shlex

from twisted.application.service import Application
from twisted.python import usage

from rexnet.crat.tap import Options, makeService

options = Options()
try:
    options.parseOptions(shlex.split(os.environ.get(
        "CRAT_OPTIONS",
        "--trust /etc/rexnet/crat.trust --jsonl /var/log/rexnet/alerts.jsonl --web 8080")))
except usage.UsageError as e:
    raise SystemExit(f"crat.tac: {e}") from None
application = Application("crat")
makeService(options).setServiceParent(application)
