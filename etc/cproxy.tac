# twistd -ny cproxy.tac: the service of `twistd cproxy`, from a .tac file. The options
# are those of cproxy(8), taken from $CPROXY_OPTIONS (no default: name at least one
# --announce target on the other network).
import os
import shlex

from twisted.application.service import Application
from twisted.python import usage

from rexnet.relay.cproxy_tap import Options, makeService

options = Options()
try:
    options.parseOptions(shlex.split(os.environ.get("CPROXY_OPTIONS", "")))
except usage.UsageError as e:
    raise SystemExit(f"cproxy.tac: {e}") from None
application = Application("cproxy")
makeService(options).setServiceParent(application)
