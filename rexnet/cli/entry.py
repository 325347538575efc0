"""Install the fast `rexnet` and `cexec` commands: `python -P -m rexnet.cli.entry [BINDIR]`.

pip writes `rexnet` and `cexec` as console scripts that start the interpreter with site
processing (`#!python` loses any flag). This step, which `make install` runs after pip,
replaces them:

- `rexnet-py` and `cexec-py`: scripts for `python -I -S` that set sys.path themselves (to
  what site gave this interpreter), load the launcher's modules from one file while it
  is good (rexnet.cli.bundle, written here) and run rexnet.cli.launcher.run;
- where a C compiler works, `rexnet-native` (rexnet/cli/native/launcher.c): it runs an
  ordinary `rexnet exec` through the agent itself, with the same checks, and hands
  everything else to `rexnet-py` / `cexec-py`;
- `rexnet` and `cexec`: the native launcher if it was built, else the Python scripts;
- the installed package's bytecode, where pip left any out of date or missing (the
  launcher's start-up reads its modules' .pyc files; -I -S does not stop that).

BINDIR defaults to the interpreter's scripts directory (where pip put the console scripts).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence

NATIVE_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native",
                             "launcher.c")


def search_path() -> list[str]:
    """The directories site added to sys.path (those `python -I -S` lacks), in order."""
    base = subprocess.run([sys.executable, "-I", "-S", "-c",
                           "import sys; print('\\0'.join(sys.path))"],
                          capture_output=True, text=True, check=True).stdout.rstrip("\n")
    bare = set(base.split("\0"))
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    found = [p for p in sys.path if p and p not in bare and os.path.isdir(p)
             and os.path.abspath(p) != os.getcwd()]
    return found if here in found else [here, *found]


def script(python: str, path: Sequence[str], command: str, bundle: str | None = None) -> str:
    """The text of the fast entry script of COMMAND ("rexnet" or "cexec"); with BUNDLE, it
    loads the launcher's modules from that file (rexnet.cli.bundle) while it is good. The
    script is compiled at every start (some 7 us a line): it stays short."""
    load = ("" if bundle is None else
            "try:  # the launcher's modules from one file, if it is good (rexnet.cli.bundle)\n"
            "    from marshal import loads\n"
            f"    with open({bundle!r}, 'rb') as f:\n"
            "        load, *bundle = loads(f.read())\n"
            "    (lambda: 0).__class__(load, globals())(*bundle)  # bundle.load\n"
            "except Exception:\n"
            "    pass  # missing, stale or damaged: imported as usual\n")
    return (f"#!{python} -IS\n"
            f"# rexnet's {command} launcher, written by `python -m rexnet.cli.entry`: -I -S\n"
            "# skips site processing; sys.path is what site gave at install time.\n"
            "import sys\n"
            f"sys.path.extend({list(path)!r})\n"
            f"{load}"
            "from rexnet.cli.launcher import run\n"
            f"run({command!r})\n")


def c_string(text: str) -> str:
    """TEXT as a C string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def find_compiler(cc: str | None = None) -> str | None:
    """The C compiler to use: CC, else $CC, cc or gcc; None when there is none."""
    return cc or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def compile_c(compiler: str, source: str, target: str,
              variants: Sequence[Sequence[str]] = ((),)) -> str:
    """Compile SOURCE into TARGET (mode 0755, replaced in one step) with the first of
    VARIANTS (extra compiler arguments) that builds; "" on success, else why not."""
    fd, temporary = tempfile.mkstemp(prefix=".rexnet-build-", dir=os.path.dirname(target) or ".")
    os.close(fd)
    for extra in variants:
        argv = [compiler, "-O2", "-Wall", "-Wextra", "-std=c99", *extra, "-o", temporary,
                source]
        try:
            done = subprocess.run(argv, capture_output=True, text=True)
        except OSError as e:
            done = subprocess.CompletedProcess(argv, 1, "", str(e))
        if done.returncode == 0:
            break
    if done.returncode != 0:
        os.unlink(temporary)
        return f"{compiler} failed: {done.stderr.strip()[:2000]}"
    os.chmod(temporary, 0o755)
    os.replace(temporary, target)
    return ""


def build_native(target: str, fallbacks: dict[str, str], cc: str | None = None) -> str:
    """Compile the native launcher into TARGET, handing what it does not do to the
    FALLBACKS ("rexnet", "cexec": the Python scripts); "" on success, else why not."""
    compiler = find_compiler(cc)
    if not compiler:
        return "no C compiler (cc, gcc or $CC)"
    return compile_c(compiler, NATIVE_SOURCE, target,
                     [[f"-DREXNET_PY={c_string(fallbacks['rexnet'])}",
                       f"-DCEXEC_PY={c_string(fallbacks['cexec'])}"]])


def write(path: str, text: str) -> None:
    """Write TEXT to PATH (mode 0755) in one step, replacing what was there."""
    fd, temporary = tempfile.mkstemp(prefix=".rexnet-entry-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(temporary, 0o755)
    os.replace(temporary, path)


def link(name: str, target: str) -> None:
    """Make NAME a symbolic link to TARGET (in the same directory), replacing NAME."""
    temporary = f"{name}.rexnet-link"
    if os.path.lexists(temporary):
        os.unlink(temporary)
    os.symlink(os.path.basename(target), temporary)
    os.replace(temporary, name)


def compile_package() -> str:
    """Compile the installed rexnet package's modules whose .pyc is missing or stale."""
    import compileall

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ok = compileall.compile_dir(package, quiet=1)
    return f"bytecode of {package} {'up to date' if ok else 'NOT all compiled'}"


def install(bindir: str, native: bool = True) -> list[str]:
    """Write the entry points into BINDIR; lines saying what was done."""
    path = search_path()
    done, python = [compile_package()], {}
    from rexnet.cli import bundle

    try:
        modules: str | None = bundle.build()
        done.append(f"wrote {modules} (the launcher's modules in one file)")
    except (OSError, SyntaxError, ValueError) as e:
        modules = None
        done.append(f"no launcher bundle ({e}): the scripts import the modules one by one")
    for command in ("rexnet", "cexec"):
        python[command] = os.path.join(bindir, f"{command}-py")
        write(python[command], script(sys.executable, path, command, modules))
        done.append(f"wrote {python[command]} (python -I -S)")
    why = build_native(os.path.join(bindir, "rexnet-native"), python) if native else (
        "not asked for (--no-native)")
    for command in ("rexnet", "cexec"):
        target = os.path.join(bindir, "rexnet-native" if not why else f"{command}-py")
        link(os.path.join(bindir, command), target)
        done.append(f"{command} -> {os.path.basename(target)}")
    if why:
        done.append(f"no native launcher: {why}")
    done.append(build_sandbox_init(bindir) if native else "no native sandbox init (--no-native)")
    return done


def build_sandbox_init(bindir: str) -> str:
    """The sandbox's C init (rexnet.worker.nativeinit) in BINDIR; a line saying how."""
    from rexnet.worker import nativeinit

    target = os.path.join(bindir, nativeinit.NAME)
    compiler = find_compiler()
    # static where the C library allows it: no dynamic loading per job (~0.15 ms of CPU)
    why = (compile_c(compiler, nativeinit.SOURCE, target, (["-static"], []))
           if compiler else "no C compiler (cc, gcc or $CC)")
    if why and os.path.exists(target):
        os.unlink(target)  # not a stale one: sandboxes fall back to the Python init
    return f"no native sandbox init: {why}" if why else f"built {target}"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    native = "--no-native" not in args
    rest = [a for a in args if a != "--no-native"]
    if len(rest) > 1 or any(a.startswith("-") for a in rest):
        print("usage: python -P -m rexnet.cli.entry [--no-native] [BINDIR]", file=sys.stderr)
        return 2
    bindir = rest[0] if rest else sysconfig.get_path("scripts")
    for line in install(os.path.abspath(bindir), native):
        print(f"rexnet.cli.entry: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
