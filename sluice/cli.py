"""The `sluice` command: up, api, worker, db upgrade, run, batches, keys, model tiny."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
from pathlib import Path
from types import FrameType

from sluice.config import Settings, get_settings
from sluice.errors import SluiceError

TERMINAL = ("completed", "failed", "expired", "cancelled")


def _stop_on_signals() -> None:
    """Turn SIGTERM into KeyboardInterrupt so every command stops the same clean way."""

    def handler(_sig: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    """API + worker + embedded Redis + SQLite in one command."""
    from sluice.firstrun import problem, serving_line
    from sluice.signals import request_stop_on_signals
    from sluice.stack import Stack, StopRequested, data_dir_lock, port_in_use

    if (why := problem(settings)) is not None:
        print(f"sluice up: {why}", file=sys.stderr)
        return 1
    if port_in_use(args.host, args.port):
        print(f"sluice up: {args.host}:{args.port} is already in use (another Sluice?); "
              "choose another with --port", file=sys.stderr)  # fmt: skip
        return 1
    with data_dir_lock(settings.data_dir) as holder:
        if holder is not None:
            print(f"sluice up: {settings.data_dir} is in use by another sluice up (pid "
                  f"{holder}); stop it or set SLUICE_DATA_DIR", file=sys.stderr)  # fmt: skip
            return 1
        flower_port = _flower_port(settings)
        if flower_port is not None:
            from sluice.flower import credentials, describe

            # Made here, before Flower starts, so this process knows to print a new login.
            flower_auth = credentials(settings)
        stop_early = False
        stack: Stack | None = None

        def request_stop() -> None:  # in a signal handler: it only sets flags
            nonlocal stop_early
            stop_early = True
            if stack is not None:
                stack.request_stop()

        # No exception lands inside a Popen or a lock: a first signal sets a flag the stack's
        # loops poll; a second raises KeyboardInterrupt (stop at once).
        request_stop_on_signals(request_stop)
        try:
            stack = Stack(settings, args.host, args.port, flower_port=flower_port)
            if stop_early:
                stack.request_stop()
            stack.start()
            print(
                f"Sluice is up at {stack.url} (engine {settings.engine}, model "
                f"{settings.served_model}); Ctrl-C stops it.",
                flush=True,
            )
            if (hint := serving_line(settings)) is not None:
                print(hint, flush=True)
            print(_auth_line(settings), flush=True)
            if flower_port is not None:
                print(describe(settings, flower_auth, flower_port), flush=True)
            stack.supervise()
        except (StopRequested, KeyboardInterrupt):
            pass
        finally:
            if stack is not None:
                print("stopping... (Ctrl-C again stops at once)", file=sys.stderr, flush=True)
                try:
                    stack.stop()
                except KeyboardInterrupt:
                    stack.kill()
        return 0


def _auth_line(settings: Settings) -> str:
    """What `sluice up` says about API keys."""
    from sluice.local_key import key_path

    where = key_path(settings).resolve()
    if settings.auth == "off":
        return (
            f"API keys are OFF (SLUICE_AUTH=off): anyone who can reach {settings.host} may "
            "read and delete every file and batch; use this only on a trusted machine"
        )
    return (
        f"API keys are on: the local admin key is in {where} (mode 0600; the sluice CLI "
        "reads it, other clients send it as `Authorization: Bearer`)"
    )


def _flower_port(settings: Settings) -> int | None:
    """The port `sluice up` starts Flower on (0: any free one), None when it starts none."""
    from sluice.stack import free_port, port_in_use

    if not settings.flower:
        return None
    if settings.flower_port == 0:
        return free_port(settings.flower_host)
    if port_in_use(settings.flower_host, settings.flower_port):
        print(f"sluice up: Flower not started: {settings.flower_host}:{settings.flower_port} is "
              "in use; set SLUICE_FLOWER_PORT (0: any free port)", file=sys.stderr)  # fmt: skip
        return None
    return settings.flower_port


def cmd_flower(_args: argparse.Namespace, settings: Settings) -> int:
    """Flower on this Sluice's Redis (the embedded one too), loopback and behind a login."""

    from sluice.flower import credentials, describe, run_flower
    from sluice.redis_server import ensure_redis

    url = ensure_redis(settings, detach=True).url
    print(describe(settings, credentials(settings)), file=sys.stderr, flush=True)
    run_flower(settings, url)


def cmd_healthcheck(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 0 when this host's worker or webhook sender is alive (container health checks)."""
    from sluice.healthcheck import sender_alive, worker_alive
    from sluice.redis_server import ensure_redis

    if args.service == "webhooks":
        why = sender_alive(settings)
    else:
        why = worker_alive(settings, ensure_redis(settings, detach=True).url)
    if why:
        print(f"unhealthy: {why}", file=sys.stderr)
        return 1
    print("healthy")
    return 0


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    """Serve the HTTP API."""
    import uvicorn

    # Imported by name: the sluice package never imports api or worker.
    uvicorn.run(
        "api.app:app_factory",
        factory=True,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        # httptools with a bound on request heads (SLUICE_MAX_HEADER_BYTES): 431 past it.
        http="api.server:BoundedHttpToolsProtocol",
        # On SIGTERM open requests (long polls, streams) get the grace, then their connections
        # close: uvicorn would otherwise wait for each, up to SLUICE_ONLINE_TIMEOUT (600 s).
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace)),
        # JSON logs: uvicorn's records go through the root handler (sluice/logs.py) too.
        log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
    )
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Run one GPU worker (one engine) until SIGTERM."""
    from sluice.firstrun import problem
    from sluice.redis_server import ensure_redis

    if (why := problem(settings)) is not None:
        print(f"sluice worker: {why}", file=sys.stderr)
        return 2
    url = ensure_redis(settings, detach=True).url
    main = importlib.import_module("worker.main")
    code: int = main.run_worker(settings, url, loglevel=args.loglevel)
    return code


def cmd_webhooks(args: argparse.Namespace, settings: Settings) -> int:
    """Deliver webhook events until SIGTERM (`sluice up` runs one; more may run anywhere);
    with --enable URL, send to a URL again that a 410 Gone disabled, and exit."""
    from sluice.webhooks.sender import run_sender

    if args.enable:
        from sluice.db import get_database
        from sluice.store.deliveries import enable_endpoint

        db = get_database(settings)
        try:
            found = enable_endpoint(db, args.enable)
        finally:
            db.dispose()
        print(f"{args.enable}: " + ("enabled again" if found else "was not disabled"))
        return 0
    _stop_on_signals()
    return run_sender(settings)


def cmd_db_upgrade(_args: argparse.Namespace, settings: Settings) -> int:
    """Apply migrations up to the newest."""
    from sluice.migrate import upgrade

    upgrade(settings.resolved_database_url)
    print(f"database at head: {settings.resolved_database_url}")
    return 0


def cmd_model_tiny(args: argparse.Namespace, _settings: Settings) -> int:
    """Build the tiny random Llama used by tests and the demo."""
    from sluice.tiny_model import build_tiny_model

    path = build_tiny_model(Path(args.dir))
    print(f"tiny model written to {path}")
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """Submit a JSONL file (or --resume a run), show progress, write the results in input
    order; exit 0 only if every request succeeded (3: the server went away)."""
    from sluice.client import Client
    from sluice.local_key import client_key
    from sluice.run import run
    from sluice.stack import Stack, free_port

    if not args.resume and (not args.file or not Path(args.file).is_file()):
        print(f"sluice run: {args.file or 'a FILE (or --resume BATCH_ID)'} does not exist"
              if args.file else "sluice run: give a FILE, or --resume BATCH_ID",
              file=sys.stderr)  # fmt: skip
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    stack = None
    url = args.url or settings.public_url
    _stop_on_signals()
    try:
        if not url:
            stack = Stack(settings, "127.0.0.1", free_port(), quiet=True)
            print(
                f"starting the embedded stack (logs in {settings.data_dir.resolve()})...",
                file=sys.stderr,
                flush=True,
            )
            stack.start()
            url = stack.url
        client = Client(url, client_key(settings))
        return run(client, settings, args, url if args.url else "", sys.stderr)
    except KeyboardInterrupt:
        return 130
    finally:
        if stack is not None:
            stack.stop()


def cmd_batches(args: argparse.Namespace, settings: Settings) -> int:
    """List, inspect, cancel a batch or stream its results."""
    from sluice.client import Client
    from sluice.local_key import client_key

    url = args.url or settings.public_url or f"http://{settings.host}:{settings.port}"
    client = Client(url, client_key(settings))
    if args.action == "list":
        for b in client.batches(args.limit):
            c = b["request_counts"]
            print(
                f"{b['id']}  {b['status']:<11} {c['completed']}/{c['total']} done, "
                f"{c['failed']} failed  {b['endpoint']}"
            )
        return 0
    if not args.batch_id:
        print(f"sluice batches {args.action}: a batch id is required", file=sys.stderr)
        return 2
    if args.action == "get":
        print(json.dumps(client.batch(args.batch_id), indent=2))
    elif args.action == "cancel":
        print(json.dumps(client.cancel(args.batch_id), indent=2))
    else:
        for chunk in client.stream(f"/v1/batches/{args.batch_id}/results"):
            sys.stdout.buffer.write(chunk)
    return 0


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """Print the deployment's status (through the API, so it works remotely)."""
    from sluice.client import Client
    from sluice.local_key import client_key
    from sluice.status import show

    url = args.url or settings.public_url or f"http://{settings.host}:{settings.port}"
    if args.watch is not None and args.watch <= 0:
        print("sluice status: --watch needs a positive number of seconds", file=sys.stderr)
        return 2
    _stop_on_signals()
    import httpx

    try:
        show(Client(url, client_key(settings)), sys.stdout, args.json, args.watch, args.batches)
    except KeyboardInterrupt:
        return 0 if args.watch is not None else 130
    except httpx.HTTPError as exc:
        print(f"sluice status: cannot reach the API at {url} ({type(exc).__name__}); is it "
              "running? (--url names another)", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _duration(text: str) -> int:
    """'90m', '24h', '30d', '3600' (seconds) -> seconds."""
    unit = DURATION_UNITS.get(text[-1:].lower(), 1) if text else 1
    number = text[:-1] if text[-1:].lower() in DURATION_UNITS else text
    if not number.isdigit() or int(number) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 3600, 90m, 24h, 30d")
    return int(number) * unit


def _key_webhook(url: str | None, settings: Settings) -> str | None:
    """A key's default webhook URL, checked as a submitted one is (InvalidInput if bad)."""
    from sluice.errors import InvalidInput
    from sluice.webhooks.ssrf import check_url

    if url is not None and (why := check_url(url, settings.webhook_networks)):
        raise InvalidInput(f"--webhook-url {why}", param="webhook_url")
    return url


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    """Create, list or revoke API keys (in the configured database)."""
    from sqlalchemy.exc import DBAPIError

    from sluice.db import get_database
    from sluice.ids import unix
    from sluice.store import keys

    db = get_database(settings)
    try:
        if args.keys_cmd == "create":
            key, info = keys.create_key(
                db,
                owner=args.owner,
                name=args.name or "",
                admin=args.admin,
                expires_at=unix() + args.expires_in if args.expires_in else None,
                rpm_limit=args.rpm,
                queued_limit=args.max_queued,
                bytes_limit=args.max_bytes,
                webhook_url=_key_webhook(args.webhook_url, settings),
            )
            print(f"created {info.id} for owner {info.owner}" + (" (admin)" if info.admin else ""),
                  file=sys.stderr)  # fmt: skip
            print("the key is shown only now; Sluice keeps only its hash:", file=sys.stderr)
            print(key)
            return 0
        if args.keys_cmd == "revoke":
            print(f"revoked {keys.revoke_key(db, args.key)}")
            return 0
        now = unix()
        for row in keys.list_keys(db, args.owner):
            state = "revoked" if row["revoked_at"] else "active"
            if state == "active" and row["expires_at"] is not None and row["expires_at"] <= now:
                state = "expired"
            limits = ", ".join(
                f"{name} {row[col]}"
                for name, col in (("rpm", "rpm_limit"), ("queued", "queued_limit"),
                                  ("bytes", "bytes_limit"))
                if row[col] is not None
            )  # fmt: skip
            print(
                f"{row['id']}  {row['prefix']}...  {state:<7}  owner {row['owner']}"
                + ("  admin" if row["admin"] else "")
                + f"  {row['name']}"
                + (f"  [{limits}]" if limits else "")
                + (f"  webhook {row['webhook_url']}" if row["webhook_url"] else "")
            )
        return 0
    except DBAPIError as exc:
        # The statement's text and parameters stay out of it: the table may be missing.
        print(f"sluice keys: the database refused ({type(exc.orig).__name__}); has "
              "`sluice db upgrade` run on it?", file=sys.stderr)  # fmt: skip
        return 1


def build_parser(settings: Settings | None = None) -> argparse.ArgumentParser:
    """The argument parser (defaults for host and port come from settings)."""
    host = settings.host if settings else "127.0.0.1"
    port = settings.port if settings else 8000
    p = argparse.ArgumentParser(prog="sluice", description=__doc__)
    p.add_argument(
        "-v", "--verbose", action="store_true", help="log Alembic's and httpx's chatter too"
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (
        ("up", cmd_up, "API + worker + embedded Redis in one command"),
        ("api", cmd_api, "serve the HTTP API"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--host", default=host)
        s.add_argument("--port", type=int, default=port)
        s.set_defaults(fn=fn)
    sub.add_parser(
        "flower", help="Flower on this Sluice's Redis (SLUICE_FLOWER_HOST/PORT/BASIC_AUTH)"
    ).set_defaults(fn=cmd_flower)
    w = sub.add_parser("webhooks", help="deliver webhook events (signed, retried)")
    w.add_argument("--enable", metavar="URL", help="re-enable a URL a 410 Gone disabled")
    w.set_defaults(fn=cmd_webhooks)
    h = sub.add_parser("healthcheck", help="exit 0 if this host's worker or sender is alive")
    h.add_argument("service", choices=["worker", "webhooks"])
    h.set_defaults(fn=cmd_healthcheck)
    s = sub.add_parser("worker", help="run a worker (one engine, one GPU)")
    s.add_argument("--loglevel", default="INFO")
    s.set_defaults(fn=cmd_worker)
    db = sub.add_parser("db", help="database commands").add_subparsers(dest="db_cmd", required=True)
    db.add_parser("upgrade", help="apply migrations").set_defaults(fn=cmd_db_upgrade)
    model = sub.add_parser("model", help="model helpers").add_subparsers(
        dest="model_cmd", required=True
    )
    t = model.add_parser("tiny", help="build a tiny random Llama in DIR")
    t.add_argument("dir")
    t.set_defaults(fn=cmd_model_tiny)
    r = sub.add_parser("run", help="run a JSONL file through Sluice and write the results")
    r.add_argument("file", nargs="?")
    r.add_argument("-o", "--output", required=True)
    r.add_argument("--model", help="for lines without one (default: what the server serves)")
    r.add_argument("--resume", metavar="BATCH_ID", help="follow a run again (its first batch)")
    r.add_argument(
        "--url", help="a running Sluice (default: SLUICE_PUBLIC_URL, else start the embedded stack)"
    )
    r.add_argument("--completion-window", default="24h")
    r.set_defaults(fn=cmd_run)
    k = sub.add_parser("keys", help="API keys: create|list|revoke").add_subparsers(
        dest="keys_cmd", required=True
    )
    kc = k.add_parser("create", help="create a key (printed once)")
    kc.add_argument("--owner", required=True, help="who owns what the key creates")
    kc.add_argument("--name", help="a label (default: the owner)")
    kc.add_argument("--admin", action="store_true", help="sees every owner's resources")
    kc.add_argument("--expires-in", type=_duration, help="e.g. 90d, 24h (default: never)")
    kc.add_argument("--rpm", type=int, help="requests per minute")
    kc.add_argument("--max-queued", type=int, help="the owner's queued requests")
    kc.add_argument("--max-bytes", type=int, help="the owner's stored file bytes")
    kc.add_argument("--webhook-url", help="default webhook endpoint of its jobs and batches")
    kc.set_defaults(fn=cmd_keys)
    kl = k.add_parser("list", help="list keys (prefixes only)")
    kl.add_argument("--owner")
    kl.set_defaults(fn=cmd_keys)
    kr = k.add_parser("revoke", help="revoke a key by id or prefix")
    kr.add_argument("key")
    kr.set_defaults(fn=cmd_keys)
    b = sub.add_parser("batches", help="list|get|cancel|results")
    b.add_argument("action", choices=["list", "get", "cancel", "results"])
    b.add_argument("batch_id", nargs="?")
    b.add_argument("--url")
    b.add_argument("--limit", type=int, default=20)
    b.set_defaults(fn=cmd_batches)
    st = sub.add_parser("status", help="queue, workers, throughput and recent batches")
    st.add_argument("--url", help="the API (default: SLUICE_PUBLIC_URL, else host:port)")
    st.add_argument("--json", action="store_true", help="JSON for scripts (one line per refresh)")
    st.add_argument(
        "--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )  # fmt: skip
    st.add_argument("--batches", type=int, default=10, help="recent batches to list (0-100)")
    st.set_defaults(fn=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sluice` console script."""
    from sluice.signals import die_with_supervisor

    die_with_supervisor()  # a child of `sluice up` or `sluice run` dies with it
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        settings = get_settings()
    except SluiceError as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return 2
    from sluice.logs import setup_logging

    # Text or JSON lines (SLUICE_LOG_FORMAT), for this process and, through the environment,
    # every child `sluice up` starts.
    setup_logging(settings.log_format, settings.log_level, settings.log_prompts)
    args = build_parser(settings).parse_args(argv)
    if not args.verbose:
        # One line per HTTP call would bury `sluice run`'s progress bar; Alembic says ten
        # lines of plugin setup on every command that imports it.
        for chatty in ("httpx", "alembic"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        return int(args.fn(args, settings))
    except SluiceError as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
