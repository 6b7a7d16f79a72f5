"""Command line: `smtp-graph-relay SUBCOMMAND` (DESIGN §4).

Why this module exists: it is how administrators set up, test and run the relay. Each
subcommand is a function returning an exit code; `main(argv)` never calls `sys.exit`, so tests
drive it like any other function.

Exit codes: 0 success, 1 failure (invalid config, token or test mail refused), 2 usage error.
`check-config` warnings (a valid setting that is probably a mistake) keep exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import TextIO

from relay import __version__
from relay.cli.history import add_history_arguments
from relay.cli.queue_request import QueueRequest, add_queue_arguments
from relay.config.advice import config_warnings
from relay.config.load import load_config
from relay.config.schema import ClientCertificate, Config
from relay.core.errors import ConfigError, DeliveryError, PolicyError
from relay.core.message.prepare import (
    Envelope,
    TraceInfo,
    prepare_for_graph,
    split_header_from_body,
)
from relay.core.policy import choose_route
from relay.delivery.attempt import send_target
from relay.ops.logs import setup_logging
from relay.ops.preflight import preflight
from relay.ops.startup import current_user
from relay.service import RelayService, serve_until_stopped

__all__ = ["entry_point", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# The bare command is a usage error (exit 2, as DESIGN §4 says of usage), but it points at the
# two commands a newcomer wants rather than printing the whole usage.
NO_COMMAND = """smtp-graph-relay: no command given.
  Try the relay without a tenant:  smtp-graph-relay sandbox
  All commands and options:        smtp-graph-relay --help
"""


def entry_point() -> None:
    """Console-script entry point."""
    sys.exit(main(sys.argv[1:]))


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run one subcommand and return its exit code."""
    stdout = out or sys.stdout
    parser, subparsers = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # `serve -c x --verbose`: the subcommand's own usage, not the top level's
            where = subparsers.get(args.command or "", parser)
            where.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 for --help
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        sys.stderr.write(NO_COMMAND)
        return EXIT_USAGE
    if args.command == "sandbox":
        from relay.cli.sandbox import run_sandbox_command

        return run_sandbox_command(args, out=stdout)
    if args.command == "hash-password":
        from relay.smtp.passwords import hash_password_command

        return hash_password_command(use_stdin=args.stdin, out=stdout)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_FAILURE
    if args.command == "check-config":
        print_routing_table(config, args.config, stdout)
        return EXIT_OK
    if args.command in ("test-auth", "test-mail"):
        # Each result is one printed line; log records would only repeat it on stderr (at
        # `logging.level: debug` the administrator asked for them, so they are shown).
        quiet = config.logging.level != "debug"
        setup_logging("critical" if quiet else "debug", config.logging.format)
    else:
        try:
            logfile = config.logging.file if args.command == "serve" else None
            setup_logging(config.logging.level, config.logging.format, file=logfile)
        except OSError as exc:
            print(
                f"cannot start: logging.file {config.logging.file}: {exc.strerror}; create its "
                f"folder and let user {current_user()} write there, or remove logging.file "
                "to log to standard error (journald)",
                file=sys.stderr,
            )
            return EXIT_FAILURE
    if args.command == "serve":
        return asyncio.run(serve_until_stopped(args.config, config))
    if args.command == "test-auth":
        return asyncio.run(test_auth(config, args.name, stdout))
    if args.command == "test-mail":
        return asyncio.run(test_mail(config, args.sender, args.recipient, stdout))
    if args.command == "queue":
        from relay.cli.queue import run_queue_command

        try:
            request = QueueRequest.from_namespace(args)
        except ValueError as exc:
            print(f"queue: --older-than: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return run_queue_command(config, request, stdout)
    if args.command == "history":
        from relay.cli.history import run_history_command

        return run_history_command(config, args, stdout)
    return EXIT_USAGE  # pragma: no cover - argparse restricts the choices


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="smtp-graph-relay",
        description="Accept plain SMTP and deliver it through Microsoft Graph sendMail.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers: dict[str, argparse.ArgumentParser] = commands.choices

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("-c", "--config", required=True, type=Path, help="YAML configuration")
        return sub

    with_config("serve", "run the relay in the foreground")
    with_config("check-config", "validate the configuration and print the routing table")
    auth = with_config("test-auth", "get a token for each auth object and explain failures")
    auth.add_argument("name", nargs="?", help="only this auth object")
    mail = with_config("test-mail", "send one test message through the configured route")
    mail.add_argument("--from", dest="sender", required=True, help="sender address")
    mail.add_argument("--to", dest="recipient", required=True, help="recipient address")
    queue = with_config("queue", "list and operate on the spool (works while the relay runs)")
    add_queue_arguments(queue)
    add_history_arguments(with_config("history", "what became of each message (final outcomes)"))
    sandbox = commands.add_parser(
        "sandbox",
        help="try the relay against a local stand-in for Microsoft 365 (no tenant needed)",
    )
    sandbox.add_argument("--port", type=int, default=2525, help="SMTP port (default 2525)")
    sandbox.add_argument(
        "--mail-dir",
        type=Path,
        default=Path("sandbox-mail"),
        help="where the messages Graph received are written (default ./sandbox-mail)",
    )
    sandbox.add_argument(
        "--config-out",
        type=Path,
        default=Path("sandbox-config.yaml"),
        help="where the generated config is kept (default ./sandbox-config.yaml)",
    )
    sandbox.add_argument("--listen", default="127.0.0.1", help="SMTP address (default 127.0.0.1)")
    sandbox.add_argument(
        "--allow",
        action="append",
        metavar="CIDR",
        help="a network that may send (needed with a non-loopback --listen)",
    )
    sandbox.add_argument("--admin-port", type=int, default=9025, help="admin port (0: any)")
    sandbox.add_argument(
        "--limit",
        action="append",
        metavar="NAME=VALUE",
        help="a sandbox limit, e.g. messages_per_minute=10 (repeatable)",
    )
    sandbox.add_argument(
        "--exchange-answer",
        choices=["error", "ndr"],
        help="how the messages/recipients limits answer (default error)",
    )
    hashing = commands.add_parser(
        "hash-password",
        help="print an argon2id hash of a password for clients[].password_hash",
        description="Read a password (twice, without echo; or one line from standard input) "
        "and print only its argon2id hash, for clients[].password_hash.",
    )
    hashing.add_argument(
        "--stdin",
        action="store_true",
        help="read the password, one line, from standard input (no prompt); "
        "implied when standard input is not a terminal",
    )
    return parser, subparsers


# --- check-config --------------------------------------------------------------------------


def print_routing_table(config: Config, source: Path, out: TextIO) -> None:
    """The effective configuration, without any secret."""
    smtp = config.smtp
    w = out.write
    w(f"Configuration {source} is valid.\n\nSMTP ({smtp.hostname})\n")
    for listener in smtp.listeners:
        where = f"{listener.address}:{listener.port}"
        w(f"  listen {where}  tls={listener.tls}  auth={listener.auth}\n")
    w(
        f"  max message size {smtp.max_message_size} bytes, max recipients "
        f"{smtp.max_recipients}, max connections {smtp.max_connections} "
        f"({smtp.max_connections_per_client} per client)\n"
        f"  messages in DATA hold at most {smtp.max_data_memory} bytes together\n"
    )
    w(
        "\nClients (by AUTH username, else first match on the connecting address; "
        "no match: 550 5.7.1)\n"
    )
    for client in config.clients:
        networks = ", ".join(str(n) for n in client.networks)
        recipients = ", ".join(client.recipients) if client.recipients is not None else "any"
        if client.username is None:
            w(f"  {client.name}: from {networks}\n")
        else:
            where = f"from {networks}" if networks else "from any address"
            w(f"  {client.name}: AUTH as {client.username}, {where}\n")
        w(f"      may send as {', '.join(client.senders)}; to {recipients}\n")
    w("\nAuth objects\n")
    for name, auth in config.auth_objects.items():
        w(f"  {name}: tenant {auth.tenant_id}, client {auth.client_id}\n")
        w(f"      credential: {_credential_source(config, name)}\n")
        w(f"      authority {auth.authority_url}\n      graph {auth.graph_base_url}\n")
        w(f"      scope {auth.effective_scope}\n")
        if auth.proxy:
            w(f"      proxy {auth.proxy}\n")
    w(
        "\nRoutes (first match on the sender wins; a queued message is routed again by its "
        "sender at each attempt)\n"
    )
    for index, route in enumerate(config.routes):
        mailbox = route.mailbox_shown
        named = "" if route.name else " (named after its first sender)"
        target = f"{', '.join(route.senders)} -> {route.auth_object}, {mailbox}"
        w(f'  routes[{index}] "{route.label}"{named}: {target}\n')
        if route.rewrite_from or not route.save_to_sent_items:
            w(
                f"      rewrite_from {str(route.rewrite_from).lower()}, save_to_sent_items "
                f"{str(route.save_to_sent_items).lower()}\n"
            )
    delivery = config.delivery
    w(
        f"\nDelivery: mode {delivery.mode}, Graph must answer within "
        f"{delivery.inline_timeout:g}s, large messages: {delivery.large_messages}\n"
    )
    admin = config.admin
    names = ", ".join(["localhost", *admin.hostnames])
    w(f"\nAdmin: http://{admin.address}:{admin.port}/ (Host header: {admin.address}, {names})\n")
    warnings = config_warnings(config)
    if warnings:
        w("\nWarnings (the relay runs like this, but probably should not)\n")
        for warning in warnings:
            w(f"  {warning.path}: {warning.problem}\n      fix: {warning.fix}\n")
    here = preflight(config, base_dir=source.parent)
    if here:
        w(f"\nOn this machine, as user {current_user()} (would stop serve, or expose a secret):\n")
        for problem in here:
            w(f"  {problem}\n")
    total = len(warnings) + len(here)
    count = f"{total} warning{'' if total == 1 else 's'}" if total else "no warnings"
    w(f"\ncheck-config: valid, {count}\n")


def _credential_source(config: Config, name: str) -> str:
    auth = config.auth_objects[name]
    credential = auth.credential
    if isinstance(credential, ClientCertificate):
        return (
            f"certificate {auth.certificate_file} (SHA-1 thumbprint {credential.thumbprint_sha1},"
            f" expires {credential.not_after:%Y-%m-%d})"
        )
    if auth.client_secret_file is not None:
        return f"client secret from file {auth.client_secret_file}"
    if auth.client_secret_env is not None:
        return f"client secret from ${auth.client_secret_env}"
    return "client secret inline in the configuration (prefer client_secret_file)"


# --- test-auth -----------------------------------------------------------------------------


async def test_auth(config: Config, only: str | None, out: TextIO) -> int:
    """Acquire a token per auth object; explain each failure with the setup step that fixes it."""
    names = [only] if only else list(config.auth_objects)
    unknown = [n for n in names if n not in config.auth_objects]
    if unknown:
        known = ", ".join(config.auth_objects)
        print(f"unknown auth object {unknown[0]!r}; defined: {known}", file=sys.stderr)
        return EXIT_USAGE
    service = RelayService(config)
    failures = 0
    try:
        for name in names:
            check = await service.tokens.check(name)
            roles = ", ".join(check.claims.roles) if check.claims else ""
            if check.ok:
                out.write(f"OK    {name}: token acquired; application roles: {roles}\n")
                continue
            failures += 1
            if check.token_acquired:
                out.write(f"FAIL  {name}: token acquired, roles: {roles or 'none'}\n")
            else:
                out.write(f"FAIL  {name}: {check.code or 'error'}: {check.description}\n")
            for problem in check.problems:
                out.write(f"      problem: {problem}\n")
            if check.remedy:
                out.write(f"      fix: {check.remedy}\n")
    finally:
        await service.graph.close()
        service.tokens.close()
    return EXIT_OK if failures == 0 else EXIT_FAILURE


# --- test-mail -----------------------------------------------------------------------------


async def test_mail(config: Config, sender: str, recipient: str, out: TextIO) -> int:
    """Send one test message through the route the sender maps to (a pool's first member)."""
    try:
        route = choose_route(config.routes, sender)
    except PolicyError as exc:
        out.write(f"FAIL  {exc.reply.text}\n")
        return EXIT_FAILURE
    if route.pool:
        route = route.member(route.pool[0])
    now = datetime.now(UTC)
    host = socket.gethostname()
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = "smtp-graph-relay test message"
    message["Date"] = format_datetime(now)
    message.set_content(
        f"This is a test message from smtp-graph-relay {__version__} on {host}.\n"
        f"Route: {route.name}, auth object {route.auth_object}, mailbox {route.mailbox}.\n"
    )
    queue_id = f"TEST{now:%Y%m%d%H%M%S}"
    prepared = prepare_for_graph(
        split_header_from_body(message.as_bytes(policy=message.policy.clone(linesep="\r\n"))),
        Envelope(mail_from=sender, recipients=(recipient,)),
        TraceInfo(
            relay_hostname=config.smtp.hostname,
            client_ip="127.0.0.1",
            client_hostname="localhost",
            helo=host,
            protocol="ESMTP",
            queue_id=queue_id,
            now=now,
        ),
        message_id_local=queue_id,
    )
    service = RelayService(config)
    target = send_target(config, route)
    try:
        result = await service.graph.send_mime(target, prepared.mime)
    except DeliveryError as failure:
        out.write(f"FAIL  {_failure_line(failure)}\n")
        return EXIT_FAILURE
    finally:
        await service.graph.close()
        service.tokens.close()
    out.write(
        f"OK    Microsoft 365 accepted the message for {recipient} from mailbox {route.mailbox} "
        f"(HTTP {result.status}, request-id {result.request_id})\n"
    )
    return EXIT_OK


def _failure_line(failure: DeliveryError) -> str:
    """What Graph (or Entra) said, in words: status and code, message, request-id, the fix."""
    answer = " ".join(
        part
        for part in (
            f"HTTP {failure.http_status}" if failure.http_status is not None else "",
            failure.code or "",
        )
        if part
    )
    text = f"{answer}: {failure.message}" if answer else str(failure.message)
    if failure.request_id:
        text += f" (request-id {failure.request_id})"
    return text + (f"; fix: {failure.remedy}" if failure.remedy else "")
