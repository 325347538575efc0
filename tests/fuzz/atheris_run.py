"""Coverage-guided fuzzing of rexnet's decoders with atheris (libFuzzer).

    python tests/fuzz/atheris_run.py TARGET [libFuzzer options, e.g. -runs=100000]

TARGET is one of tests/fuzz_targets.py's TARGETS.  Any exception other than a target's
documented decode error is a crash: libFuzzer prints it and exits non-zero.  `make fuzz`
runs every target for a while; tests/test_fuzz.py runs each briefly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).parent.parent))

with atheris.instrument_imports():
    import fuzz_targets as targets


def main() -> None:
    name = sys.argv[1]
    target = targets.TARGETS[name]
    corpus = Path(targets._dir) / f"corpus-{name}"
    corpus.mkdir(exist_ok=True)
    for n, seed in enumerate(targets.seeds()[name]):
        (corpus / f"seed{n}").write_bytes(seed)
    atheris.Setup([sys.argv[0], *sys.argv[2:], str(corpus)], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
