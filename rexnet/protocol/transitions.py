"""Automat's transition lookup, indexed: a built machine's automaton scans all its
transitions for each input (comparing the state and the input with each), which the
client's job machine (220 transitions) and the worker's channel machine (73) pay several
times per job."""

from __future__ import annotations

from typing import Any


def index_transitions(machine: Any) -> None:
    """MACHINE (a TypeMachineBuilder's build) finds its transitions in a dict built once:
    the same answers as Automat's scan, in one hash. A pair not in it goes to
    Automat's own lookup, which raises NoTransition as before."""
    automaton = machine.__automat_automaton__
    scan = automaton.outputForInput
    table = {(state, symbol): (new, tuple(outputs))
             for state, symbol, new, outputs in automaton.allTransitions()}

    def output_for_input(state: Any, symbol: Any) -> tuple[Any, list[Any]]:
        found = table.get((state, symbol))
        if found is None:
            return scan(state, symbol)  # type: ignore[no-any-return]
        return found[0], list(found[1])

    automaton.outputForInput = output_for_input


