"""twistd plugins of rexnet: one ServiceMaker per command, nothing else."""

from twisted.application.service import ServiceMaker

rexnet_worker = ServiceMaker(
    "rexnet worker", "rexnet.worker.tap", "Serve one rexnet application (cexec's cservice)",
    "rexnet-worker",
)

crat = ServiceMaker("rexnet crat", "rexnet.crat.tap", "Receive and log rexnet alerts", "crat")

cproxy = ServiceMaker(
    "rexnet cproxy", "rexnet.relay.cproxy_tap", "Relay rexnet announcements and connect-backs "
    "between two networks", "cproxy",
)

rexnet_tunnel = ServiceMaker(
    "rexnet tunnel", "rexnet.relay.tunnel_tap", "Join rexnet announce domains of several sites "
    "over TLS", "rexnet-tunnel",
)
