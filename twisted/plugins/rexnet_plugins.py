"""twistd plugins of rexnet: one ServiceMaker per command, nothing else."""

from twisted.application.service import ServiceMaker

rexnet_worker = ServiceMaker(
    "rexnet worker", "rexnet.worker_tap", "Serve one rexnet application (cexec's cservice)",
    "rexnet-worker",
)
