"""Sub-commands of `btd` that start the service's processes (registered by btd.cli): serve, worker, send,
db upgrade, and user-line (a line for the dashboard's users file).

Each command reads the settings once, when it starts, and builds what its process needs: `btd serve`
gives the gateway the worker's task table for the in-process executor (used only without a broker),
`btd worker` configures and runs the Celery worker. Heavy imports (pynetdicom, uvicorn, Celery, the
worker's model code) happen inside the commands, so `btd --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse type for a number that must be above zero (0 associations or a 0 s timeout sends nothing)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not 0 < value < float("inf"):  # NaN too
            raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
        return value

    return parse


def _port(text: str) -> int:
    """An argparse type for a TCP port (1-65535)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's sub-commands."""
    serve = subparsers.add_parser("serve", help="run the gateway: DICOM listener, REST API, stability monitor")
    serve.set_defaults(func=_serve)

    worker = subparsers.add_parser("worker", help="run a Celery worker for BTD_QUEUE_NAME (needs BTD_BROKER_URL)")
    worker.add_argument(
        "--queues",
        help="comma-separated roles to consume: scoring, reports (default BTD_WORKER_QUEUES: both)",
    )
    worker.add_argument("celery_args", nargs=argparse.REMAINDER, help="extra arguments passed to celery worker")
    worker.set_defaults(func=_worker)

    send = subparsers.add_parser("send", help="send DICOM files or folders with C-STORE (test a deployment)")
    send.add_argument("paths", nargs="+", help="files or folders (walked recursively; non-DICOM files skipped)")
    send.add_argument("--host", default="127.0.0.1")
    send.add_argument("--port", type=_port, default=11112)
    send.add_argument("--aet", default="BTD", help="called AE title (the receiver's)")
    send.add_argument("--calling-aet", default="BTDSEND", help="our AE title")
    send.add_argument(
        "--timeout", type=_positive(float), default=30.0, help="seconds to wait for the peer (default 30)"
    )
    send.add_argument(
        "--associations",
        type=_positive(int),
        default=1,
        metavar="N",
        help="send over N associations at once (default 1)",
    )
    send.add_argument("--quiet", action="store_true", help="list only the instances that failed on stdout")
    send.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar on stderr (default: when stderr is a terminal)",
    )
    send.set_defaults(func=_send)

    db = subparsers.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    upgrade = db_sub.add_parser("upgrade", help="apply every migration up to head (also done by `btd serve`)")
    upgrade.add_argument("--revision", default="head")
    upgrade.set_defaults(func=_db_upgrade)

    user = subparsers.add_parser(
        "user-line",
        help="print a BTD_USERS_FILE line (name:role:scrypt-hash) for a dashboard user; the password is read "
        "from standard input, or asked for on a terminal",
    )
    user.add_argument("name", help="the user name (letters, digits, _ . @ -), shown in the audit log")
    user.add_argument("--role", choices=("view", "act"), default="view", help="view: read only; act: also rescore")
    user.set_defaults(func=_user_line)


def _serve(_args: argparse.Namespace) -> int:
    from core.settings import get_settings
    from service.server import serve

    settings = get_settings()
    if settings.broker_url:
        return serve(settings)  # Celery workers do the tasks; this process only dispatches them
    from worker.registry import in_process_tasks  # embedded mode: the tasks run in this process

    return serve(settings, in_process_tasks=in_process_tasks(settings))


def _worker(args: argparse.Namespace) -> int:
    from core.contracts import QueueRole
    from core.settings import get_settings
    from worker.main import run_worker

    settings = get_settings()
    if args.queues:
        roles = [role.strip() for role in args.queues.split(",") if role.strip()]
        unknown = sorted(set(roles) - {role.value for role in QueueRole})
        if unknown or not roles:
            print(f"unknown queue role(s) {unknown}; use {', '.join(r.value for r in QueueRole)}", file=sys.stderr)
            return 2
        settings = settings.model_copy(update={"worker_queues": roles})
    return run_worker(settings, extra_args=list(args.celery_args or []))


def _send(args: argparse.Namespace) -> int:
    from btd.send_cli import run_send

    return run_send(args)


def _db_upgrade(args: argparse.Namespace) -> int:
    from core.db import migrate
    from core.settings import get_settings

    settings = get_settings()
    migrate.upgrade(settings, args.revision)
    print(f"database at {', '.join(migrate.current_heads(settings)) or 'base'}")
    return 0


def _user_line(args: argparse.Namespace) -> int:
    from service.api.auth import USER_NAME
    from service.api.passwords import hash_password

    if not USER_NAME.match(args.name):
        print("btd user-line: a user name is 1-64 letters, digits, _ . @ -", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("btd user-line: the passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        print("btd user-line: a password has at least 8 characters", file=sys.stderr)
        return 2
    print(f"{args.name}:{args.role}:{hash_password(password)}")
    return 0
