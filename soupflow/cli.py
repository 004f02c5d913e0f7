"""The `soupflow` command: the only place that prints. Downstream: workflow (validate, fmt,
diff), runtime (run), admin (status, dead), dicom.requestor (echo), schemas.

`soupflow --help` and `soupflow COMMAND --help` are the user's manual.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

from rich.console import Console
from rich.table import Table

from soupflow import admin, durable, schemas, tls
from soupflow.dicom.requestor import Destination, echo
from soupflow.network import Allowlist, CleartextPorts, Egress, is_loopback
from soupflow.runtime.admin_http import DEFAULT_ADMIN, parse_address
from soupflow.runtime.listeners_file import read_network
from soupflow.runtime.pacing import BACKLOG_LIMIT, HOLD_SECONDS
from soupflow.runtime.processes import WorkerRuntime, new_boot
from soupflow.runtime.supervisor import NODE_ID, Runtime, node_name
from soupflow.runtime.watch import watch
from soupflow.runtime.workers import LEASE_SECONDS, RETENTION_DAYS
from soupflow.store import NoDataError, Storage
from soupflow.store.queue import QueueError
from soupflow.workflow import diff, fmt
from soupflow.workflow.checks import check_egress
from soupflow.workflow.jsonpos import JsonSyntaxError, parse
from soupflow.workflow.load import load_paths, workflow_paths

_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
_GIT_DIFF_ARGUMENTS = 7  # path old-file old-hex old-mode new-file new-hex new-mode


def _say(console: Console, text: str, style: str | None = None) -> None:
    console.print(text, markup=False, style=style)


# ------------------------------------------------------------------------------------ run
class _EventLines(logging.Handler):
    """One printed line per runtime event (the core logs only ids, never PHI); with `json`,
    one JSON object per line, for log shippers."""

    def __init__(self, json_lines: bool = False) -> None:
        super().__init__()
        self.json_lines = json_lines

    def emit(self, record: logging.LogRecord) -> None:
        if self.json_lines:
            event = {
                "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                    timespec="milliseconds"
                ),
                "level": record.levelname.lower(),
                "logger": record.name,
                "event": record.getMessage(),
                **getattr(record, "fields", {}),
            }
            _out.file.write(json.dumps(event, ensure_ascii=True) + "\n")
            _out.file.flush()
            return
        style = {logging.WARNING: "yellow", logging.ERROR: "red"}.get(record.levelno)
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {printable(self.format(record))}"
        if style is None:  # plain lines (one per stored instance) skip rich's rendering
            _out.file.write(line + "\n")
            _out.file.flush()
        else:
            _say(_out, line, style)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """One line an operator's terminal shows as it is: control characters (an AE title with
    an escape sequence, a line break in a peer's text) become \\xNN."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def _event_lines(json_lines: bool = False, quiet_stores: bool = False) -> threading.Event:
    """Log one line per event; SIGINT and SIGTERM set the returned event. `quiet_stores`
    leaves out the lines of each stored instance and each finished message (at hundreds of
    instances a second they are most of the log); warnings and errors stay."""
    logging.basicConfig(
        level=logging.INFO, handlers=[_EventLines(json_lines)], format="%(message)s", force=True
    )
    for per_instance in ("soupflow.ingest", "soupflow.runtime.workers"):
        logging.getLogger(per_instance).setLevel(logging.WARNING if quiet_stores else logging.INFO)
    # Libraries log what they handle (request URLs can carry expanded variables, that is PHI):
    # only their warnings and errors reach the event lines.
    for library in ("pynetdicom", "httpx", "httpcore", "pydicom", "watchfiles"):
        logging.getLogger(library).setLevel(logging.WARNING)
    stopping = threading.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda *_: stopping.set())
    # `kill -USR1` prints where every thread is (code locations only, no values) to stderr:
    # what an operator needs when a runtime does not stop or does not move.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    return stopping


def default_processes() -> int:
    """`run --processes` unless given: SOUPFLOW_PROCESSES, else one worker process when this
    process may run on more than one core (conversion and activities then never take the
    interpreter lock from the listeners), else none."""
    if "SOUPFLOW_PROCESSES" in os.environ:
        return int(os.environ["SOUPFLOW_PROCESSES"])
    return 1 if len(os.sched_getaffinity(0)) > 1 else 0


def _egress_options(parser: argparse.ArgumentParser) -> None:
    """`--allowed-tcp` and `--allowed-http`: where activities may connect (loopback always)."""
    for option, variable, what in (
        ("--allowed-tcp", "SOUPFLOW_ALLOWED_TCP", "DICOM and MLLP destinations"),
        ("--allowed-http", "SOUPFLOW_ALLOWED_HTTP", "HTTP, STOW-RS and OAuth token URLs"),
    ):
        parser.add_argument(
            option,
            action="append",
            default=[os.environ[variable]] if os.environ.get(variable) else [],
            metavar="ENTRY[,ENTRY]",
            help=f"{what} allowed besides loopback: host, host:port, [v6]:port, CIDR, "
            f"CIDR:port{', a URL prefix' if 'http' in option else ''} (repeatable; env "
            f"{variable}; default: loopback only)",
        )


def _egress(args: argparse.Namespace) -> Egress:
    try:
        return Egress(
            Allowlist.parse(args.allowed_tcp, "--allowed-tcp"),
            Allowlist.parse(args.allowed_http, "--allowed-http", urls=True),
        )
    except ValueError as exc:
        raise SystemExit(f"soupflow: {exc}") from None


def _storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--queue",
        default=os.environ.get("SOUPFLOW_QUEUE", ""),
        metavar="URL",
        help="the queue: a postgresql:// URL several nodes share (default: the SQLite file "
        "in the data folder; env SOUPFLOW_QUEUE)",
    )
    parser.add_argument(
        "--objects",
        type=Path,
        default=Path(os.environ["SOUPFLOW_OBJECTS"])
        if os.environ.get("SOUPFLOW_OBJECTS")
        else None,
        metavar="DIR",
        help="where received objects are kept, a folder every node can read on a shared "
        "mount (default: <data>/objects; env SOUPFLOW_OBJECTS)",
    )


def _lease_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=float(os.environ.get("SOUPFLOW_LEASE_SECONDS", LEASE_SECONDS)),
        help="how long a worker's claim on a message lasts unless renewed; a node that dies "
        f"loses its messages to the others after this (default {LEASE_SECONDS:.0f}; env "
        "SOUPFLOW_LEASE_SECONDS)",
    )
    parser.add_argument(
        "--retention-days",
        type=float,
        default=float(os.environ.get("SOUPFLOW_RETENTION_DAYS", RETENTION_DAYS)),
        help="completed and filtered messages are deleted from the queue after this many "
        f"days (default {RETENTION_DAYS:g}; 0 keeps them; env SOUPFLOW_RETENTION_DAYS)",
    )


def _admin_tls(args: argparse.Namespace) -> tls.ServerContexts | None:
    """The admin endpoint's HTTPS, from the --admin-certificate options (ValueError: why not)."""
    if not args.admin_certificate:
        if args.admin_private_key or args.admin_trusted_certificates:
            raise ValueError(
                "--admin-private-key and --admin-trusted-certificates need --admin-certificate"
            )
        return None
    trusted = Path(args.admin_trusted_certificates) if args.admin_trusted_certificates else None
    settings = tls.ServerTls(
        certificate_file=Path(args.admin_certificate).resolve(),
        private_key_file=Path(args.admin_private_key or args.admin_certificate).resolve(),
        private_key_password=tls.secret(args.admin_private_key_password),
        trusted_certificates_file=trusted.resolve() if trusted else None,
        require_client_certificate=trusted is not None,
        allowed_fingerprints=frozenset(),
    )
    try:
        return tls.ServerContexts(settings)
    except tls.TlsError as exc:
        raise ValueError(f"the admin endpoint's TLS: {exc}") from None


def _storage(args: argparse.Namespace) -> Storage:
    return Storage(args.data, args.queue, args.objects)


def _node_id(text: str) -> str:
    if not NODE_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a node id is letters, digits, '.', '_' and '-' (it names a folder and "
            "appears in lease owners)"
        )
    return text


def _work(args: argparse.Namespace) -> int:
    stopping = _event_lines()
    runtime = WorkerRuntime(
        args.workflows,
        args.data,
        args.workers,
        args.node,
        args.boot,
        args.keep_objects,
        _egress(args),
        _storage(args),
        args.lease_seconds,
        args.retention_days,
        args.housekeeping,
        args.metrics_file,
        socket.socket(fileno=args.control_fd) if args.control_fd is not None else None,
        args.backlog_limit,
    )
    try:
        runtime.start()
    except (QueueError, NoDataError) as exc:
        _say(_err, f"cannot start: {exc}", "red")
        return EXIT_PROBLEMS
    logging.getLogger(__name__).info(
        "worker process %s ready: %d workers, %d workflows",
        args.boot,
        args.workers,
        len(runtime.known),
    )
    watcher = threading.Thread(
        target=watch, args=(args.workflows, runtime.reload, stopping), daemon=True
    )
    watcher.start()
    parent = os.getppid()
    while not stopping.wait(0.5):
        if os.getppid() != parent:  # the runtime that started us is gone: so are we
            logging.getLogger(__name__).error("worker process %s: its runtime exited", args.boot)
            break
    runtime.stop()
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    egress = _egress(args)
    try:
        cleartext = CleartextPorts.parse(args.allow_cleartext)
        admin = parse_address(args.admin)
        if admin is not None and not is_loopback(admin[0]) and not args.admin_token:
            raise ValueError(
                f"--admin on {admin[0]} (not loopback) needs --admin-token or SOUPFLOW_ADMIN_TOKEN"
            )
        admin_tls = _admin_tls(args)
    except ValueError as exc:
        raise SystemExit(f"soupflow: {exc}") from None
    json_lines = args.log_format == "json"
    stopping = _event_lines(json_lines, args.quiet_stores)
    runtime = Runtime(
        args.workflows,
        args.data,
        args.host,
        args.workers,
        args.keep_objects,
        args.processes,
        allow_cleartext=cleartext,
        egress=egress,
        admin=admin,
        admin_token=args.admin_token,
        storage=_storage(args),
        admin_tls=admin_tls,
        node=args.node_id,
        lease_seconds=args.lease_seconds,
        retention_days=args.retention_days,
        backlog_limit=args.backlog_limit,
    )
    try:
        runtime.start()
    except QueueError as exc:
        _say(_err, f"cannot start: {exc}", "red")
        return EXIT_PROBLEMS
    _listener_table(runtime, args, json_lines)
    watcher = threading.Thread(
        target=watch,
        args=(args.workflows, runtime.reload, stopping),
        name="soupflow-watch",
        daemon=True,
    )
    watcher.start()
    # In slices, not one wait: the kernel hands SIGTERM to any thread of the process when the
    # main thread has a signal pending already, and Python runs the handler only once the
    # main thread wakes (a main thread asleep in `wait()` never would).
    while not stopping.wait(0.5):
        continue
    log = logging.getLogger("soupflow")
    log.info("stopping: no new associations; finishing the stores in progress")
    runtime.stop()
    return EXIT_OK


def _listener_table(runtime: Runtime, args: argparse.Namespace, json_lines: bool) -> None:
    """What listens, as a table (or, with JSON lines, one `listener` event per workflow)."""
    log = logging.getLogger("soupflow")
    if json_lines:
        for row in runtime.rows:
            fields = {"listener": asdict(row)}
            log.info("listener %s: %s", row.workflow_id, row.state, extra={"fields": fields})
    else:
        table = Table(title=f"soupflow listeners on {args.host} (data in {args.data})")
        for column in ("workflow", "port", "AE title", "who may call", "state"):
            table.add_column(column)
        for row in runtime.rows:
            state = row.state if not row.detail else f"{row.state}: {row.detail}"
            table.add_row(row.workflow, str(row.port or ""), row.our_aet, row.who_may_call, state)
        _out.print(table)
    if not runtime.rows:
        log.warning(
            "no workflow files in %s: nothing listens yet (watching for files)", args.workflows
        )


# ---------------------------------------------------------------------------- operations
def _age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _status(args: argparse.Namespace) -> int:
    try:
        rows = admin.status(_storage(args), args.workflows)
    except admin.NoDataError as exc:
        _say(_err, str(exc), "red")
        return EXIT_PROBLEMS
    except QueueError as exc:  # a full disk, a damaged database: say so, no traceback
        _say(_err, f"cannot read the queue: {exc}", "red")
        return EXIT_PROBLEMS
    if args.json:
        _say(_out, json.dumps(admin.status_json(rows), indent=2))
        return EXIT_OK
    table = Table(title=f"soupflow status ({args.data})")
    for column in (
        "workflow",
        "port",
        "state",
        "queued",
        "processing",
        "completed",
        "filtered",
        "dead",
        "duplicates",
        "oldest pending",
    ):
        table.add_column(column)
    for row in rows:
        counts = row.counts
        table.add_row(
            row.workflow or row.workflow_id,
            str(row.port or ""),
            row.state,
            *(
                str(counts[state])
                for state in ("queued", "processing", "completed", "filtered", "dead", "duplicates")
            ),
            _age(row.oldest_pending_seconds),
        )
    _out.print(table)
    network = read_network(args.data)
    if network is not None:
        _say(
            _out,
            f"network: listening on {network['host']}; cleartext allowed off loopback on "
            f"ports: {network['allow_cleartext']}; --allowed-tcp: {network['allowed_tcp']}; "
            f"--allowed-http: {network['allowed_http']}",
        )
    return EXIT_OK


def _dead(args: argparse.Namespace) -> int:
    ids = args.ids or None
    if args.action in ("retry", "purge") and not (ids or args.workflow or args.all):
        _say(
            _err,
            f"say which dead messages to {args.action}: REQUEST_ID..., --workflow ID, or --all",
            "red",
        )
        return EXIT_USAGE
    try:
        found = admin.dead_messages(_storage(args), args.workflow, ids, args.workflows)
    except admin.NoDataError as exc:
        _say(_err, str(exc), "red")
        return EXIT_PROBLEMS
    except QueueError as exc:
        _say(_err, f"cannot read the queue: {exc}", "red")
        return EXIT_PROBLEMS
    if args.action == "list":
        table = Table(title=f"dead messages ({len(found)})")
        for column in (
            "RequestId",
            "workflow",
            "SOPInstanceUID",
            "activity",
            "attempts",
            "reason",
            "died",
        ):
            table.add_column(column, overflow="fold")
        for dead in found:
            died = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(dead.died_at))
            table.add_row(
                dead.request_id,
                dead.workflow_id,
                dead.sop_instance_uid,
                dead.activity,
                str(dead.attempts),
                dead.reason,
                died,
            )
        _out.print(table)
        return EXIT_OK
    if args.action == "show":
        for dead in found:
            _say(_out, f"RequestId {dead.request_id}", "bold")
            for label, value in (
                ("workflow", dead.workflow_id),
                ("SOPInstanceUID", dead.sop_instance_uid),
                ("calling AE", dead.calling_aet),
                ("failed activity", dead.activity),
                ("attempts", str(dead.attempts)),
                ("reason", dead.reason),
            ):
                _say(_out, f"  {label}: {value}")
            if dead.detail:
                _say(_out, "  detail:")
                for line in dead.detail.splitlines():
                    _say(_out, f"    {line}")
            for outcome in dead.outcomes:
                _say(
                    _out,
                    f"  activity {outcome.activity_id}: {'succeeded' if outcome.succeeded else 'failed'} ({outcome.detail})",
                )
        if ids and len(found) < len(ids):
            _say(_err, "some ids are not dead messages in this data folder", "yellow")
            return EXIT_PROBLEMS
        return EXIT_OK
    if args.action == "retry":
        count = admin.retry_dead(_storage(args), ids, args.workflow)
        _say(_out, f"{count} dead message(s) queued again")
        return EXIT_OK
    if not args.yes:
        if not sys.stdin.isatty():
            _say(
                _err,
                f"purge deletes {len(found)} dead message(s) and their objects for good: confirm with --yes",
                "red",
            )
            return EXIT_USAGE
        answer = _out.input(
            f"delete {len(found)} dead message(s) and their objects for good? [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            _say(_out, "nothing purged")
            return EXIT_OK
    count = admin.purge_dead(_storage(args), ids, args.workflow)
    _say(_out, f"{count} dead message(s) purged")
    return EXIT_OK


# ----------------------------------------------------------------------------------- echo
def _echo(args: argparse.Namespace) -> int:
    context, server_name = None, ""
    if args.tls:
        server_name = args.server_name or args.host
        settings = tls.ClientTls(
            server_name=server_name,
            trusted_certificates_file=args.trusted,
            certificate_file=args.client_cert,
            private_key_file=args.client_key or args.client_cert,
            private_key_password=tls.secret(args.client_key_password),
        )
        try:
            context = tls.client_context(settings)
        except tls.TlsError as exc:
            _say(_err, f"cannot use the TLS options: {exc}", "red")
            return EXIT_PROBLEMS
    destination = Destination(
        args.host,
        args.port,
        args.aet,
        args.called_aet,
        args.timeout,
        tls_server_name=server_name,
        tls_context=context,
    )
    ok, what = echo(destination)
    _say(
        _out if ok else _err,
        f"{args.called_aet} at {args.host}:{args.port}: {what}",
        "green" if ok else "red",
    )
    return EXIT_OK if ok else EXIT_PROBLEMS


# ------------------------------------------------------------------------------- validate
def _validate(args: argparse.Namespace) -> int:
    workflows = load_paths(args.paths)
    if args.allowed_tcp or args.allowed_http:  # the operator's lists: check as `run` would
        egress = _egress(args)
        for loaded in workflows:
            check_egress(loaded, egress)
    issues = [issue for loaded in workflows for issue in loaded.issues]
    errors = sum(issue.severity == "error" for issue in issues)
    warnings = len(issues) - errors
    if args.json:
        _say(_out, json.dumps([issue.as_json() for issue in issues], indent=2, ensure_ascii=False))
    else:
        for issue in issues:
            _say(_out, str(issue), "red" if issue.severity == "error" else "yellow")
        if not workflows:
            _say(_err, "no workflow files found (.json, .hl7Workflow, .soupworkflow)", "yellow")
        elif issues:
            _say(_err, f"{errors} error(s), {warnings} warning(s) in {len(workflows)} file(s)")
        else:
            _say(_err, f"{len(workflows)} file(s) valid", "green")
    failed = errors > 0 or (args.strict and warnings > 0)
    return EXIT_PROBLEMS if failed else EXIT_OK


# ------------------------------------------------------------------------------------ fmt
def _fmt(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for path in workflow_paths(args.paths):
        try:
            text = path.read_text(encoding="utf-8-sig")
            parsed = parse(text)
        except (OSError, UnicodeDecodeError) as exc:
            _say(_err, f"{path}: cannot read: {exc}", "red")
            status = EXIT_PROBLEMS
            continue
        except JsonSyntaxError as exc:
            where = f"{path}:{exc.position.line}:{exc.position.column}"
            _say(_err, f"{where}: not valid JSON: {exc.message} (left unchanged)", "red")
            status = EXIT_PROBLEMS
            continue
        if parsed.duplicate_keys:
            _say(
                _err,
                f"{path}: {parsed.duplicate_keys[0]}: key appears twice; fix it first (left unchanged)",
                "red",
            )
            status = EXIT_PROBLEMS
            continue
        formatted = fmt.format_document(parsed.value)
        if formatted == text:
            continue
        if args.check:
            _say(_out, f"would reformat {path}")
            status = EXIT_PROBLEMS
        else:
            durable.replace(path, formatted.encode("utf-8"))
            _say(_out, f"reformatted {path}")
    return status


# ----------------------------------------------------------------------------------- diff
def _read_document(name: str) -> object:
    if name == os.devnull:
        return None
    return parse(Path(name).read_text(encoding="utf-8-sig")).value


def _diff(args: argparse.Namespace) -> int:
    files = args.files
    as_git_driver = len(files) == _GIT_DIFF_ARGUMENTS
    if len(files) not in (2, _GIT_DIFF_ARGUMENTS):
        _say(
            _err, "soupflow diff takes OLD NEW (or the 7 arguments git passes a diff driver)", "red"
        )
        return EXIT_USAGE
    old_name, new_name = (files[1], files[4]) if as_git_driver else (files[0], files[1])
    try:
        old, new = _read_document(old_name), _read_document(new_name)
    except OSError as exc:
        _say(_err, f"cannot read {exc.filename}: {exc.strerror}", "red")
        return EXIT_USAGE
    except JsonSyntaxError as exc:
        _say(
            _err,
            f"not valid JSON at {exc.position.line}:{exc.position.column}: {exc.message}",
            "red",
        )
        return EXIT_USAGE
    lines = diff.diff_documents(old, new)
    title = files[0] if as_git_driver else f"{old_name} -> {new_name}"
    _say(_out, f"soupflow diff {title}", "bold")
    for line in lines or ["no semantic changes"]:
        style = {"+": "green", "-": "red", "~": "yellow"}.get(line.lstrip()[:1])
        _say(_out, line, style)
    # git stops at a diff driver that exits non-zero, so only the plain form reports changes.
    return EXIT_PROBLEMS if lines and not as_git_driver else EXIT_OK


# --------------------------------------------------------------------------------- schema
def _schema(args: argparse.Namespace) -> int:
    if args.check:
        stale = schemas.stale_files(args.out)
        for name in stale:
            _say(
                _err,
                f"{args.out / name} is out of date with the model: run `soupflow schema`",
                "red",
            )
        return EXIT_PROBLEMS if stale else EXIT_OK
    for name in schemas.write_files(args.out):
        _say(_out, f"wrote {args.out / name}")
    return EXIT_OK


# ---------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soupflow",
        description="A DICOM workflow runtime for Integration Soup workflow files.",
    )
    parser.add_argument("--version", action="version", version=f"soupflow {version('soupflow')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser(
        "validate",
        help="check workflow files and folders",
        description="Check workflow files (and every workflow file in the folders given): "
        "the schema, links between settings, AE titles, paths, templates, and, across the "
        "files given, that each WorkflowId and port is used once. Prints one line per "
        "problem as FILE:LINE:COL: /json/pointer: error|warning: message (hint). Exit 0 when "
        "valid, 1 when a file has errors (or warnings, with --strict).",
    )
    validate.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    validate.add_argument("--strict", action="store_true", help="treat warnings as errors")
    validate.add_argument("--json", action="store_true", help="print the problems as JSON")
    _egress_options(validate)
    validate.set_defaults(run=_validate)

    formatter = commands.add_parser(
        "fmt",
        help="rewrite workflow files in canonical layout",
        description="Rewrite workflow files in canonical layout (stable key order, 2-space "
        "indent, final newline). Only the layout changes: every field is kept. Exit 1 "
        "with --check when a file would change.",
    )
    formatter.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    formatter.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a file would change"
    )
    formatter.set_defaults(run=_fmt)

    differ = commands.add_parser(
        "diff",
        help="semantic diff of two workflow files",
        description="Show what changed between two workflow files: settings by name, links "
        "by the name of what they point to, enum numbers with their names, reordered "
        "activities. Exit 1 when they differ. Also works as a git diff driver: see README.",
    )
    differ.add_argument("files", nargs="+", metavar="OLD NEW")
    differ.set_defaults(run=_diff)

    schema_command = commands.add_parser(
        "schema",
        help="write or check the published JSON Schemas",
        description="Write the JSON Schemas generated from the model into a folder "
        "(default ./schemas), or with --check exit 1 when the files there are out of date.",
    )
    schema_command.add_argument(
        "--check", action="store_true", help="exit 1 if the files differ from the model"
    )
    schema_command.add_argument(
        "--out", type=Path, default=Path("schemas"), help="folder (default: schemas)"
    )
    schema_command.set_defaults(run=_schema)

    runner = commands.add_parser(
        "run",
        help="run the DICOM listeners of a workflows folder",
        description="Start one listener (C-STORE, or STOW-RS) per valid, enabled workflow in the folder. "
        "Each received instance is fsynced to the data folder and queued before the sender "
        "hears Success; workers then run its workflow (filters, variables, activities). The "
        "folder is watched: files that appear, change or go take effect while it runs. "
        "Ctrl-C or SIGTERM stops accepting, lets stores in progress finish, and exits 0. Options default to the SOUPFLOW_WORKFLOWS, SOUPFLOW_DATA,"
        " SOUPFLOW_HOST, SOUPFLOW_WORKERS, SOUPFLOW_PROCESSES and SOUPFLOW_KEEP_OBJECTS environment"
        " variables.",
    )
    runner.add_argument(
        "--workflows",
        type=Path,
        default=Path(os.environ.get("SOUPFLOW_WORKFLOWS", "workflows")),
        help="workflow files folder (default: workflows)",
    )
    runner.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("SOUPFLOW_DATA", "data")),
        help="spool and queue folder (default: data)",
    )
    runner.add_argument(
        "--host",
        default=os.environ.get("SOUPFLOW_HOST", "127.0.0.1"),
        help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)",
    )
    runner.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("SOUPFLOW_WORKERS", "2")),
        help="threads processing the queue, per process (default: 2; 0 receives and queues only)",
    )
    runner.add_argument(
        "--processes",
        type=int,
        default=default_processes(),
        help="worker processes, each with --workers threads, on the same queue; they also "
        "serve some of the connections this process accepts (DICOM and STOW-RS), and this "
        "process runs no workers (default: 1 on a machine with more than one core, else 0; "
        "0: the workers are threads of this process)",
    )
    runner.add_argument(
        "--backlog-limit",
        type=int,
        default=int(os.environ.get("SOUPFLOW_BACKLOG_LIMIT", BACKLOG_LIMIT)),
        metavar="N",
        help="back-pressure: while a workflow has more than N messages due and its workers "
        f"are delivering, each answer to a sender waits (at most {HOLD_SECONDS:g} s, after "
        "the commit) until they catch up; a destination that is down never holds intake "
        f"(default {BACKLOG_LIMIT}; 0: never hold; env SOUPFLOW_BACKLOG_LIMIT)",
    )
    runner.add_argument(
        "--keep-objects",
        action="store_true",
        default=os.environ.get("SOUPFLOW_KEEP_OBJECTS") == "1",
        help="keep each received object after its message completes (default: delete it)",
    )
    runner.add_argument(
        "--allow-cleartext",
        default=os.environ.get("SOUPFLOW_ALLOW_CLEARTEXT", ""),
        metavar="PORTS|*",
        help="on a non-loopback --host, let these ports' listeners run without TLS "
        "(default: none; a cleartext listener there is refused; env SOUPFLOW_ALLOW_CLEARTEXT)",
    )
    _egress_options(runner)
    runner.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get("SOUPFLOW_LOG_FORMAT", "text"),
        help="text (one line per event, default) or json (one JSON object per line: time, "
        "level, logger, event; the listener table as events; env SOUPFLOW_LOG_FORMAT)",
    )
    runner.add_argument(
        "--quiet-stores",
        action="store_true",
        default=os.environ.get("SOUPFLOW_QUIET_STORES") == "1",
        help="leave out the line of each stored instance and finished message",
    )
    runner.add_argument(
        "--admin",
        default=os.environ.get("SOUPFLOW_ADMIN", DEFAULT_ADMIN),
        metavar="ADDR:PORT|off",
        help=f"the admin endpoint: /metrics, /healthz, /readyz (default {DEFAULT_ADMIN}; port "
        "0 picks one; its URL goes to <data>/admin.json; env SOUPFLOW_ADMIN)",
    )
    runner.add_argument(
        "--admin-token",
        default=os.environ.get("SOUPFLOW_ADMIN_TOKEN", ""),
        help="a bearer token the admin endpoint requires (needed off loopback; env "
        "SOUPFLOW_ADMIN_TOKEN)",
    )
    for option, env, text in (
        (
            "--admin-certificate",
            "SOUPFLOW_ADMIN_CERTIFICATE",
            "the admin endpoint speaks HTTPS only, with this certificate (PEM, its chain after it)",
        ),
        (
            "--admin-private-key",
            "SOUPFLOW_ADMIN_PRIVATE_KEY",
            "its private key (PEM; default: in the certificate file)",
        ),
        (
            "--admin-private-key-password",
            "SOUPFLOW_ADMIN_PRIVATE_KEY_PASSWORD",
            "the key's password (${env:NAME} allowed)",
        ),
        (
            "--admin-trusted-certificates",
            "SOUPFLOW_ADMIN_TRUSTED_CERTIFICATES",
            "CA certificates (PEM): clients of the admin endpoint must present one they signed",
        ),
    ):
        runner.add_argument(
            option, default=os.environ.get(env, ""), metavar="FILE", help=f"{text} (env {env})"
        )
    _storage_options(runner)
    runner.add_argument(
        "--node-id",
        type=_node_id,
        default=node_name(),
        help="this node's name in leases, unique among nodes sharing a queue (default: the "
        "host name; env SOUPFLOW_NODE)",
    )
    _lease_options(runner)
    runner.set_defaults(run=_run)

    worker = commands.add_parser(
        "work",
        help="a worker process (started by `run --processes`)",
        description="Workers, on the queue of a data folder that `soupflow run` receives "
        "into: the workflows folder is loaded and watched, no listener is opened (with "
        "--control-fd, the connections that runtime hands over are served too).",
    )
    worker.add_argument("--workflows", type=Path, required=True)
    worker.add_argument("--data", type=Path, required=True)
    worker.add_argument("--workers", type=int, default=2)
    worker.add_argument("--node", default=node_name(), help="this machine's name in leases")
    worker.add_argument("--boot", default=new_boot(), help="this process's id in leases")
    worker.add_argument("--keep-objects", action="store_true")
    worker.add_argument(
        "--no-housekeeping",
        dest="housekeeping",
        action="store_false",
        help="leave the retention purge and the orphan sweep to another process (`soupflow "
        "run` passes it to its worker processes: it runs them once for all)",
    )
    worker.add_argument(
        "--metrics-file",
        type=Path,
        help="write this process's counters there every second, for the /metrics of the "
        "runtime that started it (`soupflow run --processes` passes it)",
    )
    worker.add_argument(
        "--control-fd",
        type=int,
        help="a Unix socket from the runtime that started it: serve the connections it hands "
        "over (`soupflow run --processes` passes it)",
    )
    worker.add_argument(
        "--backlog-limit", type=int, default=BACKLOG_LIMIT, help="as `run --backlog-limit`"
    )
    _egress_options(worker)
    _storage_options(worker)
    _lease_options(worker)
    worker.set_defaults(run=_work)

    echo_command = commands.add_parser(
        "echo",
        help="test a DICOM connection (C-ECHO)",
        description="Associate with a DICOM peer and send a C-ECHO: the way to check a "
        "DicomSenderSetting's RemoteHost, RemotePort and AE titles. Exit 0 on success.",
    )
    echo_command.add_argument("host")
    echo_command.add_argument("port", type=int)
    echo_command.add_argument(
        "--aet", default="SOUPFLOW", help="our (calling) AE title (default: SOUPFLOW)"
    )
    echo_command.add_argument(
        "--called-aet", default="ANY-SCP", help="the peer's AE title (default: ANY-SCP)"
    )
    echo_command.add_argument("--timeout", type=float, default=10.0, help="seconds (default: 10)")
    echo_command.add_argument(
        "--tls", action="store_true", help="DICOM over TLS, as a DicomSenderSetting with UseSsl"
    )
    echo_command.add_argument(
        "--trusted", type=Path, help="CA certificates (PEM) besides the system store"
    )
    echo_command.add_argument("--client-cert", type=Path, help="our client certificate (PEM)")
    echo_command.add_argument("--client-key", type=Path, help="its private key (PEM)")
    echo_command.add_argument(
        "--client-key-password", default="", help="the key's password (${env:NAME} allowed)"
    )
    echo_command.add_argument(
        "--server-name", default="", help="the name the certificate must hold (default: host)"
    )
    echo_command.set_defaults(run=_echo)

    data_default = Path(os.environ.get("SOUPFLOW_DATA", "data"))
    status_command = commands.add_parser(
        "status",
        help="listeners, queue depth and outcomes per workflow",
        description="Per workflow: its listener (from the running runtime), how many messages "
        "are queued, processing, completed, filtered and dead, how many resends were dropped "
        "as duplicates (DeduplicateWindowSeconds), and the age of the oldest pending one.",
    )
    status_command.add_argument(
        "--data", type=Path, default=data_default, help="data folder (default: data)"
    )
    status_command.add_argument(
        "--workflows",
        type=Path,
        default=Path(os.environ.get("SOUPFLOW_WORKFLOWS", "workflows")),
        help="workflow files, for names when no runtime runs (default: workflows)",
    )
    status_command.add_argument("--json", action="store_true", help="print JSON for tools")
    _storage_options(status_command)
    status_command.set_defaults(run=_status)

    dead = commands.add_parser(
        "dead",
        help="see, retry or purge dead messages",
        description="Dead messages wait for an operator. list: every dead message with its "
        "activity, attempts and reason. show ID...: one in full. retry: queue them again "
        "(a running runtime picks them up; activities that succeeded are not repeated). "
        "purge: delete them and their objects (asks first; --yes to skip).",
    )
    dead.add_argument("action", choices=("list", "show", "retry", "purge"))
    dead.add_argument("ids", nargs="*", metavar="REQUEST_ID")
    dead.add_argument("--workflow", help="only this WorkflowId")
    dead.add_argument("--all", action="store_true", help="every dead message (retry, purge)")
    dead.add_argument("--yes", action="store_true", help="purge without asking")
    dead.add_argument("--data", type=Path, default=data_default, help="data folder (default: data)")
    dead.add_argument(
        "--workflows",
        type=Path,
        default=Path(os.environ.get("SOUPFLOW_WORKFLOWS", "workflows")),
        help="workflow files, for activity names (default: workflows)",
    )
    _storage_options(dead)
    dead.set_defaults(run=_dead)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
