"""Exit codes of rexnet commands when the failure is rexnet's, not the job's.

A job's own status passes through unchanged (0-255; 128+N for a job killed by signal N),
so rexnet's own failures use the top of the range, as ssh uses 255.
"""

NOT_ALLOWED = 246
"""The worker does not run that program: it is not in the worker's --commands allow-list
(or the worker runs a fixed COMMAND); the job did not start."""
MEMORY_LIMIT = 247
"""The worker ended the job: it used more memory than the worker's --job-memory."""
TIME_LIMIT = 248
"""The worker ended the job: it ran longer than the worker's --job-timeout."""
CONFIG = 249
"""A mistake in a configuration file (the message names the file and line)."""
USAGE = 250
"""Bad command line."""
CREDENTIAL = 251
"""A credential is missing, unsafe (group/world-readable), corrupt or of the wrong role."""
REFUSED = 252
"""The worker refused the job or broke the protocol; the job did not start."""
AUTH_FAILED = 253
"""Workers answered, but none passed the mutual TLS checks."""
NO_WORKER = 254
"""No worker answered within --timeout."""
WORKER_LOST = 255
"""The connection to the worker dropped before the job finished."""

DESCRIPTIONS = {
    NOT_ALLOWED: "the worker does not allow that command (see its --commands)",
    MEMORY_LIMIT: "the job hit the worker's memory limit (--job-memory)",
    TIME_LIMIT: "the job hit the worker's time limit (--job-timeout)",
    CONFIG: "a mistake in a configuration file (FILE:LINE in the message)",
    USAGE: "bad command line",
    CREDENTIAL: "credential refused (missing, unsafe mode, corrupt or wrong role)",
    REFUSED: "the worker refused the job or broke the protocol; the job did not start",
    AUTH_FAILED: "workers answered but none passed authentication",
    NO_WORKER: "no worker answered within --timeout",
    WORKER_LOST: "the worker was lost before the job finished",
}
