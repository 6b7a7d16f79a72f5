"""The Postfix-style queue tools through `main(argv)` and as a process: list filters and --json,
show --eml and its remedy, ids without case, hold/release, retry --mailbox, delete ALL, pause and
resume, shape. The spool is a real file spool written by the relay's own store."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.sandbox import Sandbox
from relay.store.files import FileStore
from relay.store.protocol import mailbox_key
from tests.integration.test_cli import child_env, write_config
from tests.integration.test_queue_cli import QUEUE, entry, run

SCANNER, ALERTS = "scanner@contoso.com", "Alerts@Contoso.com"
AADSTS_ERROR = (
    "451 4.7.0 Entra ID refused the relay's credentials (AADSTS7000215), try again later "
    "AADSTS7000215"
)
MESSAGES = {
    "0A1B2C3D": b"Subject: old scan\r\n\r\nfirst\r\n",
    "0E0F1A2B": b"Subject: alert\r\n\r\n\xe9t\xe9 8-bit body\r\n",
    "DEAD0001": b"Subject: dead\r\n\r\nx\r\n",
}


@pytest.fixture
def spool_config(sandbox: Sandbox, tmp_path: Path) -> Path:
    """Two queued messages (2 h old from the scanner, 2 min old from alerts) and a dead one."""
    now = time.time()

    async def fill() -> None:
        store = FileStore(tmp_path / "spool", reserve_bytes=0)
        await store.recover()
        old = entry("0A1B2C3D", created=now - 7200, last_error=AADSTS_ERROR)
        young = entry(
            "0E0F1A2B",
            created=now - 120,
            mailbox=ALERTS,
            mail_from="alerts@contoso.com",
            next_attempt=now + 3600,
            attempts=1,
        )
        await store.put(old, MESSAGES["0A1B2C3D"])
        await store.put(young, MESSAGES["0E0F1A2B"])
        await store.put(entry("DEAD0001", created=now - 90_000), MESSAGES["DEAD0001"], claimed=True)
        await store.bury(entry("DEAD0001", created=now - 90_000), "550 5.1.1 ErrorInvalidUser")
        await store.close()

    asyncio.run(fill())
    return write_config(sandbox, tmp_path, delivery=QUEUE)


def listed(config: Path, *argv: str) -> list[str]:
    code, output = run(config, "list", "--json", *argv)
    assert code == 0
    return [item["queue_id"] for item in json.loads(output)]


# --- list -------------------------------------------------------------------------------------


def test_list_mailbox_filter_ignores_ascii_case(spool_config: Path) -> None:
    """--mailbox matches as the relay compares addresses: A-Z without case."""
    assert listed(spool_config, "--mailbox", "ALERTS@contoso.COM") == ["0E0F1A2B"]
    assert listed(spool_config, "--mailbox", "nobody@contoso.com") == []


def test_list_filters_combine(spool_config: Path) -> None:
    """--sender, --mailbox and --older-than narrow together (all must hold)."""
    assert listed(spool_config, "--older-than", "1h") == ["DEAD0001", "0A1B2C3D"]
    assert listed(spool_config, "--older-than", "1h", "--sender", "SCANNER@contoso.com") == [
        "DEAD0001",
        "0A1B2C3D",
    ]
    assert listed(spool_config, "--older-than", "1h", "--mailbox", ALERTS) == []
    assert listed(spool_config, "--older-than", "1m", "--mailbox", ALERTS) == ["0E0F1A2B"]


def test_list_table_is_filtered_too(spool_config: Path) -> None:
    code, output = run(spool_config, "list", "--sender", "alerts@contoso.com")
    assert code == 0
    assert "0E0F1A2B" in output
    assert "0A1B2C3D" not in output


def test_list_json_has_state_ages_attempts_and_last_error(spool_config: Path) -> None:
    code, output = run(spool_config, "list", "--json")
    assert code == 0
    items = {item["queue_id"]: item for item in json.loads(output)}
    young, old, dead = items["0E0F1A2B"], items["0A1B2C3D"], items["DEAD0001"]
    assert (young["state"], old["state"], dead["state"]) == ("queue", "queue", "dead")
    assert 7100 < old["age_seconds"] < 7300
    assert 3500 < young["next_in_seconds"] <= 3600
    assert (old["attempts"], old["last_error"]) == (3, AADSTS_ERROR)
    assert dead["dead_reason"] == "550 5.1.1 ErrorInvalidUser"
    assert young["mailbox_paused"] is False


def test_a_bad_older_than_is_a_usage_error(spool_config: Path) -> None:
    assert run(spool_config, "list", "--older-than", "soon")[0] == 2


# --- show ---------------------------------------------------------------------------------------


def test_show_gives_the_error_code_once_and_its_remedy(spool_config: Path) -> None:
    code, output = run(spool_config, "show", "0A1B2C3D")
    assert code == 0
    assert output.count("AADSTS7000215") == 1
    assert "last error:   451 4.7.0 Entra ID refused the relay's credentials (AADSTS7000215)" in (
        output
    )
    assert "remedy:       the client secret is wrong" in output
    assert output.count("remedy:") == 1


def test_show_eml_file_holds_the_stored_bytes(spool_config: Path, tmp_path: Path) -> None:
    target = tmp_path / "export.eml"
    code, output = run(spool_config, "show", "0E0F1A2B", "--eml", str(target))
    assert code == 0
    assert target.read_bytes() == MESSAGES["0E0F1A2B"]
    assert output == f"0E0F1A2B: {len(MESSAGES['0E0F1A2B'])} bytes written to {target}\n"


def queue_process(config: Path, *argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "queue", "-c", str(config), *argv],
        capture_output=True,
        env=child_env(),
        timeout=60,
        check=False,
    )


def test_show_eml_to_stdout_is_byte_exact_in_a_process(spool_config: Path) -> None:
    """8-bit bytes and CRLF come out unchanged: `queue show ID --eml > copy.eml`."""
    done = queue_process(spool_config, "show", "0e0f1a2b", "--eml")
    assert done.returncode == 0
    assert done.stdout == MESSAGES["0E0F1A2B"]


def test_list_json_parses_in_a_process(spool_config: Path) -> None:
    done = queue_process(spool_config, "list", "--json", "--mailbox", SCANNER)
    assert done.returncode == 0
    assert [item["queue_id"] for item in json.loads(done.stdout)] == ["DEAD0001", "0A1B2C3D"]


# --- ids without case -----------------------------------------------------------------------


@pytest.mark.parametrize("typed", ["0a1b2c3d", "0A1b2C3d"])
def test_queue_ids_are_matched_without_case(spool_config: Path, typed: str) -> None:
    code, output = run(spool_config, "show", typed)
    assert code == 0
    assert "queue id:     0A1B2C3D" in output
    assert run(spool_config, "hold", typed) == (
        0,
        "0A1B2C3D: on hold; it is not delivered until `queue release`\n",
    )
    assert run(spool_config, "delete", typed) == (0, "0A1B2C3D: deleted (was hold)\n")


# --- hold / release / retry -----------------------------------------------------------------


def test_hold_and_release_move_a_queued_message(spool_config: Path) -> None:
    assert run(spool_config, "hold", "0A1B2C3D")[0] == 0
    _, listing = run(spool_config, "list")
    assert listing.startswith("1 queued, 0 in delivery, 1 dead, 0 quarantined, 0 corrupt, 1 held")
    assert (spool_config.parent / "spool" / "hold" / "0A1B2C3D.json").exists()
    assert run(spool_config, "retry", "0A1B2C3D") == (
        1,
        "0A1B2C3D: cannot retry while it is hold: release it first (queue release)\n",
    )
    assert run(spool_config, "release", "0A1B2C3D") == (
        0,
        "0A1B2C3D: released; back in the queue\n",
    )
    assert run(spool_config, "release", "0A1B2C3D") == (1, "0A1B2C3D: not on hold (it is queue)\n")


def test_hold_refuses_a_dead_letter(spool_config: Path) -> None:
    assert run(spool_config, "hold", "DEAD0001") == (
        1,
        "DEAD0001: cannot hold it while it is dead (only queued messages)\n",
    )


def test_hold_all_and_release_all(spool_config: Path) -> None:
    assert run(spool_config, "hold", "--all") == (0, "2 message(s) put on hold\n")
    assert listed(spool_config, "--mailbox", ALERTS) == ["0E0F1A2B"]
    assert json.loads(run(spool_config, "list", "--json")[1])[1]["state"] == "hold"
    assert run(spool_config, "release", "--all") == (0, "2 message(s) released\n")
    assert run(spool_config, "hold", "--all", "0A1B2C3D")[0] == 2


def test_hold_of_a_message_in_delivery_is_refused(spool_config: Path) -> None:
    """The relay holds a claim: hold and delete say it is being delivered now; it stays active."""
    spool = spool_config.parent / "spool"

    async def relay_holds(then: Callable[[], None]) -> None:
        relay = FileStore(spool, reserve_bytes=0)
        await relay.recover()
        assert await relay.claim("0A1B2C3D") is not None
        try:
            await asyncio.to_thread(then)
        finally:
            await relay.close()

    def operate() -> None:
        code, output = run(spool_config, "hold", "0A1B2C3D")
        assert code == 1
        assert "being delivered right now" in output
        assert run(spool_config, "delete", "ALL") == (
            0,
            "deleted 2 message(s); 1 being delivered right now were left alone\n",
        )

    asyncio.run(relay_holds(operate))
    assert (spool / "active" / "0A1B2C3D.json").exists()


def test_retry_mailbox_makes_only_that_mailbox_due_now(spool_config: Path) -> None:
    assert run(spool_config, "retry", "--mailbox", "alerts@contoso.com") == (
        0,
        "1 message(s) queued for immediate delivery\n",
    )
    items = {i["queue_id"]: i for i in json.loads(run(spool_config, "list", "--json")[1])}
    assert items["0E0F1A2B"]["next_attempt"] == 0.0
    assert items["DEAD0001"]["state"] == "dead"


# --- delete ALL ---------------------------------------------------------------------------------


def test_delete_all_in_lower_case_is_refused(spool_config: Path) -> None:
    assert run(spool_config, "delete", "all") == (
        2,
        "to delete every message, type ALL in capitals (as postsuper -d ALL)\n",
    )
    assert len(listed(spool_config)) == 3


def test_delete_ALL_removes_every_message_not_in_delivery(spool_config: Path) -> None:  # noqa: N802
    assert run(spool_config, "hold", "0A1B2C3D")[0] == 0
    assert run(spool_config, "delete", "ALL") == (0, "deleted 3 message(s)\n")
    assert listed(spool_config) == []
    assert list((spool_config.parent / "spool" / "data").iterdir()) == []


# --- pause / resume -----------------------------------------------------------------------------


def test_pause_is_durable_and_marked_in_list(spool_config: Path) -> None:
    code, output = run(spool_config, "pause", "ALERTS@contoso.com")
    assert code == 0
    assert "delivery paused" in output
    _, listing = run(spool_config, "list")
    assert "delivery paused for: alerts@contoso.com (contoso)" in listing
    assert "[mailbox paused]" in listing.split("0E0F1A2B", 1)[1].splitlines()[0]
    assert "[mailbox paused]" not in listing.split("0A1B2C3D", 1)[1].splitlines()[0]

    async def paused() -> frozenset[tuple[str, str]]:
        store = FileStore(spool_config.parent / "spool", reserve_bytes=0)
        await store.open_for_operator()
        try:
            return await store.paused_mailboxes()
        finally:
            await store.close()

    assert asyncio.run(paused()) == {mailbox_key("contoso", ALERTS)}
    assert run(spool_config, "resume", "alerts@contoso.com") == (
        0,
        "alerts@contoso.com: delivery resumed\n",
    )
    assert asyncio.run(paused()) == frozenset()
    assert "paused" not in run(spool_config, "list")[1]


def test_pause_needs_a_mailbox_address(spool_config: Path) -> None:
    assert run(spool_config, "pause")[0] == 2
    assert run(spool_config, "pause", "0A1B2C3D")[0] == 2


# --- shape --------------------------------------------------------------------------------------


def test_shape_counts_each_mailbox_in_its_age_bucket(spool_config: Path) -> None:
    """The 2-minute-old alert is in the 5m column, the 2-hour-old scan in 160m; dead letters
    are not waiting and are left out."""
    code, output = run(spool_config, "shape")
    assert code == 0
    header, total, *rows = output.splitlines()
    assert header.split()[:3] == ["MAILBOX", "T", "5m"]
    assert header.split()[-4:] == ["1280m", "1280m+", "LAST", "ERROR"]
    assert total.split() == ["TOTAL", "2", "1", "0", "0", "0", "0", "1", "0", "0", "0", "0"]
    scanner = next(r for r in rows if r.startswith(SCANNER))
    assert scanner.split()[1:12] == ["1", "0", "0", "0", "0", "0", "1", "0", "0", "0", "0"]
    assert scanner.endswith(AADSTS_ERROR)
    alerts = next(r for r in rows if r.startswith("alerts@contoso.com"))
    assert alerts.split()[1:12] == ["1", "1", "0", "0", "0", "0", "0", "0", "0", "0", "0"]
    assert alerts.endswith("Microsoft 365 is busy (ServiceUnavailable)")


def test_show_eml_of_a_damaged_message_refuses_and_sets_it_aside(spool_config: Path) -> None:
    """Bytes that no longer match their SHA-256 are never exported as if they were the mail."""
    (spool_config.parent / "spool" / "data" / "0A1B2C3D.eml").write_bytes(b"truncated")
    code, output = run(spool_config, "show", "0A1B2C3D", "--eml")
    assert code == 1
    assert output.startswith("0A1B2C3D: cannot export it: ")
    assert "0A1B2C3D" not in listed(spool_config)
