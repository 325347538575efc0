"""`rexnet keygen`: an application's credentials, more of them, and revoking them."""

from __future__ import annotations

import argparse
from pathlib import Path

from rexnet.cli.usage import Parser, fail
from rexnet.protocol import exitcodes

MAX_DAYS = 36500


def cmd_keygen(args: argparse.Namespace) -> int:
    from rexnet.security import credentials as c

    if not 1 <= args.days <= MAX_DAYS:
        fail(f"--days must be between 1 and {MAX_DAYS}", exitcodes.USAGE)
    if not args.issue and (args.name or (args.out and not args.export_ca)):
        fail("--name and --out go with --issue", exitcodes.USAGE)
    if sum(map(bool, (args.revoke, args.issue, args.export_ca))) > 1:
        fail("--revoke, --issue and --export-ca are separate commands", exitcodes.USAGE)
    from rexnet.security import revocation

    try:
        if args.export_ca:
            ca = c.load_ca(Path(args.target))
            out = Path(args.out) if args.out else Path(args.target).with_name(
                f"{ca.app}{c.PEM_SUFFIX}")
            from rexnet.security.trust import write_ca_pem

            write_ca_pem(out, ca.cert, overwrite=True)
            print(f"wrote {out} (the CA certificate alone, for crat --trust and cproxy --trust)")
            return 0
        if args.revoke:
            ca = c.load_ca(Path(args.target))
            target, added = revocation.revoke(ca.path, ca.cert, args.revoke)
            for line in added:
                print(f"revoked {line}")
            print(f"{target}: {len(added)} added; copy it to the workers' and clients' "
                  "--revoked FILE")
            return 0
        if args.issue:
            if not args.name:
                fail("--issue needs --name NAME", exitcodes.USAGE)
            ca_path = Path(args.target)
            ca = c.load_ca(ca_path)
            role: c.Role = "client" if args.issue == "admin" else args.issue
            key, cert = c.issue(ca.key, ca.cert, role, args.name, args.days,
                                admin=args.issue == "admin")
            out = Path(args.out) if args.out else (
                Path(args.dir) if args.dir else ca_path.parent
            ) / f"{ca.app}.{args.name}.{args.issue}"
            c.write_private(out, c.credential_file_bytes(key, cert, ca.cert))
            revocation.record_issued(ca_path, ca.app, [cert])
            print(f"wrote {out} ({args.issue} credential {args.name!r} of {ca.app})")
            return 0
        paths = c.keygen(args.target, Path(args.dir or "."), args.days)
        revocation.record_issued(paths[0], args.target, [
            c.load_credential(path, role).cert
            for path, role in zip(paths[1:], c.ROLES, strict=True)])
    except c.CredentialError as e:
        fail(str(e), exitcodes.CREDENTIAL)
    print(f"wrote {paths[0]} (keep it with the administrator), {paths[1]} (for workers), "
          f"{paths[2]} (for clients), {paths[0]}.pem (the CA certificate, for crat and cproxy)")
    return 0


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    kg = sub.add_parser("keygen", help="make an application's credentials",
                        description="Make APP.ca, APP.worker and APP.client (mode 0600), or "
                        "with --issue, another credential from APP.ca.")
    kg.add_argument("target", metavar="APP | APP.ca",
                    help="application name, or with --issue the CA file")
    kg.add_argument("--dir", "-d", metavar="DIR", help="where to write (default: . or, with "
                    "--issue, beside the CA file)")
    kg.add_argument("--issue", choices=["client", "worker", "relay", "admin"],
                    help="issue one more credential of this role from APP.ca (relay: for "
                    "cproxy, which can sign relay trailers but never run a job; admin: a "
                    "client credential that may also cancel, attach to and read every "
                    "client's detached jobs)")
    kg.add_argument("--export-ca", action="store_true", help="write APP.ca's certificate "
                    "alone to APP.ca.pem (or --out), for crat --trust and cproxy --trust")
    kg.add_argument("--name", metavar="NAME", help="holder's name for --issue (a user or host)")
    kg.add_argument("--out", "-o", metavar="FILE", help="file for --issue "
                    "(default: APP.NAME.ROLE)")
    kg.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    kg.add_argument("--revoke", metavar="NAME|FILE", help="revoke every credential issued "
                    "to NAME (as recorded in APP.issued), or the credential FILE: adds it to "
                    "APP.revoked beside APP.ca")
    kg.set_defaults(func=cmd_keygen)
