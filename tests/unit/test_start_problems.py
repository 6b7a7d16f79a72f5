"""relay.core.start_problems: each start failure worded as the setting, the cause and the fix."""

from __future__ import annotations

import errno

import pytest

from relay.core.start_problems import Listening, bind_problem, spool_problem

SMTP25 = Listening("SMTP listener", "smtp.listeners[0]", "0.0.0.0", 25)


def test_a_privileged_port_without_the_capability_points_to_the_unit_and_2525() -> None:
    """Port 25 as an ordinary user: name CAP_NET_BIND_SERVICE, the unit, and port 2525."""
    text = str(bind_problem(SMTP25, errno.EACCES, "Permission denied"))
    assert text.startswith("cannot start: SMTP listener smtp.listeners[0] (0.0.0.0:25):")
    assert "CAP_NET_BIND_SERVICE" in text
    assert "systemd unit" in text
    assert "2525" in text


def test_an_address_not_on_this_machine_says_so() -> None:
    """EADDRNOTAVAIL names the address key to change."""
    target = Listening("SMTP listener", "smtp.listeners[1]", "10.9.9.9", 2525)
    text = str(bind_problem(target, errno.EADDRNOTAVAIL, "Cannot assign requested address"))
    assert "10.9.9.9 is not an address of this machine" in text
    assert "smtp.listeners[1].address" in text


def test_an_unknown_bind_error_keeps_the_systems_words() -> None:
    """Whatever else the kernel says is passed on, still naming the listener."""
    text = str(bind_problem(SMTP25, errno.EINVAL, "Invalid argument"))
    assert text == "cannot start: SMTP listener smtp.listeners[0] (0.0.0.0:25): Invalid argument"


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM])
def test_an_unwritable_spool_names_the_user_and_the_chown(code: int) -> None:
    """Permission denied on the spool: which user, the chown, the unit's StateDirectory=."""
    text = str(spool_problem("/var/lib/smtp-graph-relay", code, "Permission denied", user="mail"))
    assert "delivery.spool_dir /var/lib/smtp-graph-relay is not writable by user mail" in text
    assert "chown -R mail /var/lib/smtp-graph-relay" in text
    assert "StateDirectory=" in text


def test_a_full_file_system_says_free_space() -> None:
    text = str(spool_problem("/spool", errno.ENOSPC, "No space left on device", user="mail"))
    assert "the file system is full" in text
