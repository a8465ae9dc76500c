"""`flagd lab ...`: the traffic lab's commands (registered by flagd.cli as a typer sub-app).

Thin like the rest of the CLI: each command builds settings, calls one function, and turns the
errors it expects into one line on stderr and an exit code (3 for missing programs, 130 on
Ctrl-C, after the lab has been torn down).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

lab_app = typer.Typer(
    no_args_is_help=True, help="Generate labelled captures of real applications in namespaces."
)


class Exit(enum.IntEnum):
    OK = 0
    ERROR = 1  # the lab could not run: no root, a server failed, ...
    USAGE = 2
    MISSING = 3  # programs are missing: the message has the apt-get line
    INTERRUPTED = 130


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def _apt_install(apt: str) -> None:
    """Run the doctor's apt-get line with a policy-rc.d that exits 101 (unless one exists), so
    no package starts its daemon outside the lab, and non-interactive (postfix asks otherwise)."""
    import os
    import subprocess

    own = not POLICY_RC_D.exists()
    if own:
        POLICY_RC_D.write_text("#!/bin/sh\n# written by flagd lab doctor --install\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        res = subprocess.run([*apt.split(), "-q"], env=env, stdout=subprocess.DEVNULL)
    finally:
        if own:
            POLICY_RC_D.unlink()
    if res.returncode:
        typer.echo(f"flagd: `{apt}` failed with status {res.returncode}", err=True)
        raise typer.Exit(Exit.ERROR)


@lab_app.command()
def doctor(
    install: Annotated[
        bool, typer.Option("--install", help="Install what is missing with apt-get (root).")
    ] = False,
) -> None:
    """List the programs the lab needs, which are installed, and the apt-get line for the rest."""
    from flagd.lab.apps import APPS, CLASSES
    from flagd.lab.doctor import REQUIREMENTS, diagnose
    from flagd.lab.topology import netns_unavailable
    from flagd.lab.tunnel import Ipsec, OpenVpn, WireGuard

    needs = {label: [(n, APPS[n].programs) for n in names] for label, names in CLASSES.items()}
    needs["vpn-*"] = [(t.name, t.programs) for t in (WireGuard, OpenVpn, Ipsec)]
    report = diagnose(needs)
    if install and report.apt:
        typer.echo(f"installing: {report.apt}")
        _apt_install(report.apt)
        for req in REQUIREMENTS.values():  # import probes remember their first answer
            getattr(req.check, "cache_clear", lambda: None)()
        report = diagnose(needs)
    width = max(len(r[2]) for r in report.rows)
    for label, app, program, ok in report.rows:
        typer.echo(f"{'ok     ' if ok else 'MISSING'}  {program:<{width}}  {label} / {app}")
    reason = netns_unavailable()
    if reason:
        typer.echo(f"\nnamespaces: {reason}")
    if report.apt:
        typer.echo(f"\nmissing programs; install them with:\n  {report.apt}")
        typer.echo("(with a policy-rc.d that exits 101, so no daemon starts outside the lab)")
        raise typer.Exit(Exit.MISSING)
    typer.echo("\nevery program the lab needs is installed")
    if reason:
        raise typer.Exit(Exit.ERROR)


@lab_app.command()
def generate(
    out: Annotated[
        Path,
        typer.Option("--out", help="Output directory: <class>/<session>.pcap and manifest.json."),
    ],
    classes: Annotated[
        str | None, typer.Option("--classes", help="Comma-separated classes (default: all).")
    ] = None,
    apps: Annotated[
        str | None,
        typer.Option("--apps", help="Comma-separated app names to restrict each class to."),
    ] = None,
    tunnel: Annotated[
        str,
        typer.Option(
            "--tunnel",
            help="Comma-separated tunnel modes: none, wireguard, openvpn, ipsec.",
        ),
    ] = "none",
    sessions: Annotated[
        int,
        typer.Option(
            "--sessions",
            min=1,
            help="Sessions per class (and tunnel) in the plan; with --flows-per-class, the most.",
        ),
    ] = 10,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed for every random choice of the run.")
    ] = 0,
    seconds: Annotated[
        float, typer.Option("--seconds", min=1, help="Target length of one session.")
    ] = 10.0,
    clients: Annotated[
        int,
        typer.Option(
            "--clients", min=1, help="Client namespaces running sessions at once (at most 32)."
        ),
    ] = 1,
    random_ports: Annotated[
        bool, typer.Option("--random-ports", help="Random server ports (defeats port shortcuts).")
    ] = False,
    keep_packets: Annotated[
        int, typer.Option("--keep-packets", min=0, help="Packets per flow kept on disk (0: all).")
    ] = 1000,
    conditions: Annotated[
        str,
        typer.Option(
            "--conditions",
            help="Network conditions per session: random (delay, jitter, loss, rate, MTU, TCP "
            "congestion control drawn from the seed) or none (a plain link, as older runs).",
        ),
    ] = "random",
    flows_per_class: Annotated[
        int | None,
        typer.Option(
            "--flows-per-class",
            min=1,
            help="Skip a class's sessions once its kept flows reach this many.",
        ),
    ] = None,
) -> None:
    """Run client sessions against real servers and write one labelled capture per session.

    An existing OUT/manifest.json is resumed: its sessions are kept and the rest of the same
    seed's plan runs (the settings must be the same; --clients and --flows-per-class may differ).
    """
    from flagd.lab.apps import CLASSES
    from flagd.lab.doctor import MissingPrograms
    from flagd.lab.generate import Settings
    from flagd.lab.generate import generate as run
    from flagd.lab.topology import MAX_CLIENTS, LabError

    # checked here rather than as the option's bound so that `flagd` start-up does not import
    # the topology module (14 ms of every command) for one constant
    if clients > MAX_CLIENTS:
        raise typer.BadParameter(f"at most {MAX_CLIENTS}, one /30 of the lab's client range each",
                                 param_hint="'--clients'")
    settings = Settings(
        out=out,
        classes=_split(classes) or tuple(CLASSES),
        apps=_split(apps),
        tunnels=_split(tunnel) or ("none",),
        sessions=sessions,
        seed=seed,
        seconds=seconds,
        clients=clients,
        random_ports=random_ports,
        keep_packets=keep_packets,
        conditions=conditions,
        flows_per_class=flows_per_class,
    )
    if (out / "manifest.json").exists():
        typer.echo(f"resuming the run in {out}")

    def progress(rec: dict) -> None:
        state = "ok  " if rec["valid"] else "SKIP"
        why = "" if rec["valid"] else f"  ({rec['reason']})"
        typer.echo(
            f"{state} {rec['id']:<34} {rec['seconds']:6.1f} s {rec['packets']:7d} pkts "
            f"{len(rec['flows']):2d} flows{why}"
        )

    try:
        doc = run(settings, progress)
    except MissingPrograms as e:
        typer.echo(f"flagd: {e}", err=True)
        raise typer.Exit(Exit.MISSING) from None
    except LabError as e:
        typer.echo(f"flagd: {e}", err=True)
        raise typer.Exit(Exit.ERROR) from None
    except KeyboardInterrupt:
        typer.echo("flagd: interrupted; the lab was torn down", err=True)
        raise typer.Exit(Exit.INTERRUPTED) from None
    for label, c in doc["summary"].items():
        typer.echo(
            f"{label:<14} {c['sessions']:4d} sessions {c['rejected']:3d} rejected "
            f"{c['flows']:5d} flows {c['flows_per_minute']:7.1f} flows/min"
        )
    short = {
        label: c["flows"]
        for label, c in doc["summary"].items()
        if flows_per_class and c["flows"] < flows_per_class
    }
    if short:  # the plan ran out first: only another run (seed) or a larger plan adds flows
        what = ", ".join(f"{label} {n}" for label, n in short.items())
        typer.echo(f"flagd: the plan ended below {flows_per_class} flows for {what}", err=True)
    typer.echo(f"manifest: {out / 'manifest.json'}")
