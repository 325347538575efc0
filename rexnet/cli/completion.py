"""Bash completion for `rexnet` (and `cexec`), written from the command's own parser.

setup.py installs it as share/bash-completion/completions/rexnet at build time;
`python -m rexnet.cli.completion` prints it.
"""

from __future__ import annotations

import argparse
import shlex

from rexnet.cli.manpages import subcommands

FILE_METAVARS = {"FILE", "DIR", "KEYFILE", "APP | APP.ca"}

APPS = r"""sed -n 's/^[[:space:]]*\[applications\.\([A-Za-z0-9_-]*\)\].*/\1/p' \
        ${1:-${REXNET_CONFIG:-rexnet.toml "${XDG_CONFIG_HOME:-$HOME/.config}/rexnet/config.toml" \
        /etc/rexnet/config.toml}} 2>/dev/null"""


def _words(parser: argparse.ArgumentParser) -> tuple[list[str], list[str], dict[str, str]]:
    """Options, options that take a value, and value completions (choices) per option."""
    options, valued, choices = [], [], {}
    for action in parser._actions:
        for name in action.option_strings:
            options.append(name)
            if action.nargs != 0:
                valued.append(name)
                if action.choices:
                    choices[name] = " ".join(map(str, action.choices))
                elif str(action.metavar) in FILE_METAVARS:
                    choices[name] = "@files"
    return options, valued, choices


def script() -> str:
    """The completion script."""
    from rexnet.cli.main import parser

    top = parser()
    subs = subcommands(top)
    top_options = _words(top)[0]
    cases = []
    value_cases = []
    for name, (_, sub) in subs.items():
        options, valued, choices = _words(sub)
        cases.append(f"        {name}) opts={shlex.quote(' '.join(options))} ;;")
        for option, words in choices.items():
            action = ('COMPREPLY=($(compgen -f -- "$cur"))' if words == "@files" else
                      f"COMPREPLY=($(compgen -W {shlex.quote(words)} -- \"$cur\"))")
            value_cases.append(f"        {name}:{option}) {action}; return ;;")
        skip = "|".join(f"{name}:{o}" for o in valued if o not in choices)
        if skip:
            value_cases.append(f"        {skip}) return ;;")
    exec_options, _, _ = _words(subs["exec"][1])
    return f"""\
# bash completion for rexnet and cexec (generated from rexnet's parser; do not edit)

_rexnet_apps() {{
    {APPS}
}}

_rexnet() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    local cmd="" conf="" opts i
    COMPREPLY=()
    if [[ "${{COMP_WORDS[0]##*/}}" == cexec ]]; then
        cmd=exec
    else
        for ((i = 1; i < COMP_CWORD; i++)); do
            case "${{COMP_WORDS[i]}}" in
                {'|'.join(subs)}) cmd="${{COMP_WORDS[i]}}"; break ;;
                --config) conf="${{COMP_WORDS[i+1]}}"; ((i++)) ;;
            esac
        done
    fi
    if [[ -z "$cmd" ]]; then
        if [[ "$prev" == --config ]]; then
            COMPREPLY=($(compgen -f -- "$cur")); return
        fi
        COMPREPLY=($(compgen -W {shlex.quote(' '.join([*top_options, *subs]))} -- "$cur"))
        return
    fi
    case "$cmd:$prev" in
{chr(10).join(value_cases)}
    esac
    case "$cmd" in
{chr(10).join(cases)}
        *) opts={shlex.quote(' '.join(exec_options))} ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    elif [[ "$cmd" != keygen ]]; then
        COMPREPLY=($(compgen -W "$(_rexnet_apps "$conf")" -- "$cur") $(compgen -f -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}}

complete -F _rexnet rexnet cexec
"""


if __name__ == "__main__":
    print(script(), end="")
