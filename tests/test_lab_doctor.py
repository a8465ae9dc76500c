"""`flagd lab doctor --install`: apt-get runs with a policy-rc.d that keeps daemons stopped.

apt-get is replaced by a script on PATH that records what it saw, so nothing is installed.
"""

from __future__ import annotations

import os

import pytest
import typer

from flagd.lab import cli as lab_cli

FAKE_APT = """#!/bin/sh
{ echo "args: $*"; echo "frontend: $DEBIAN_FRONTEND"; cat "$POLICY" 2>/dev/null; } > "$RECORD"
exit "$APT_STATUS"
"""


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt = bin_dir / "apt-get"
    apt.write_text(FAKE_APT)
    apt.chmod(0o755)
    policy = tmp_path / "policy-rc.d"
    monkeypatch.setattr(lab_cli, "POLICY_RC_D", policy)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("POLICY", str(policy))
    monkeypatch.setenv("RECORD", str(tmp_path / "record"))
    monkeypatch.setenv("APT_STATUS", "0")
    return policy, tmp_path / "record"


def test_install_runs_apt_with_a_temporary_policy(fake_apt):
    policy, record = fake_apt
    lab_cli._apt_install("apt-get install -y --no-install-recommends ethtool prosody")
    seen = record.read_text()
    assert "args: install -y --no-install-recommends ethtool prosody -q" in seen
    assert "frontend: noninteractive" in seen
    assert "exit 101" in seen  # the policy was in place while apt-get ran
    assert not policy.exists()  # and is gone afterwards


def test_install_keeps_an_existing_policy(fake_apt):
    policy, record = fake_apt
    policy.write_text("#!/bin/sh\nexit 0\n")
    lab_cli._apt_install("apt-get install -y ethtool")
    assert "exit 0" in record.read_text()
    assert policy.read_text() == "#!/bin/sh\nexit 0\n"


def test_failed_install_is_an_error_and_still_removes_the_policy(fake_apt, monkeypatch, capsys):
    policy, _ = fake_apt
    monkeypatch.setenv("APT_STATUS", "100")
    with pytest.raises(typer.Exit) as exc:
        lab_cli._apt_install("apt-get install -y ethtool")
    assert exc.value.exit_code == lab_cli.Exit.ERROR
    assert "failed with status 100" in capsys.readouterr().err
    assert not policy.exists()
