"""The shipped models travel with the package: in the wheel, in a non-editable install (found
without the source tree), and by name (`--model lab12`, `flagd models`) in the editable checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flagd.cli import app
from flagd.infer import MODELS_DIR, BundleError, default_model, installed_models, resolve_model

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(__file__).parent / "data" / "lab-tls.pcap"
UNIT = REPO / "systemd" / "flagd.service"
SHIPPED = ("iscx-vpn2016", "lab12")
BUNDLE_FILES = ("bundle.json", "model.pt", "phrases.json", "metrics.json", "README.md")


def test_editable_checkout_finds_the_bundles_under_the_package():
    assert MODELS_DIR == REPO / "flagd" / "models"
    assert (REPO / "models").resolve() == MODELS_DIR  # the top-level models/ is the same directory
    assert list(installed_models()) == list(SHIPPED)
    assert default_model() == MODELS_DIR / "iscx-vpn2016"


def test_model_names_and_paths_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model("lab12") == MODELS_DIR / "lab12"
    assert resolve_model(str(MODELS_DIR / "lab12")) == MODELS_DIR / "lab12"
    monkeypatch.setenv("FLAGD_MODEL", "lab12")  # the environment's default may be a name too
    assert default_model() == MODELS_DIR / "lab12"
    (tmp_path / "lab12").mkdir()  # an existing path wins: --model lab12 keeps meaning ./lab12 here
    assert resolve_model("lab12") == Path("lab12")
    with pytest.raises(BundleError, match=r"shipped: iscx-vpn2016, lab12"):
        resolve_model("nosuch")
    with pytest.raises(BundleError, match="no such model bundle directory"):
        resolve_model("./nosuch")


def test_flagd_models_lists_every_bundle_with_its_figures():
    r = CliRunner().invoke(app, ["models"])
    assert r.exit_code == 0, r.output
    blocks = r.output.split("\n" + "lab12")
    assert blocks[0].startswith("iscx-vpn2016  (default)\n") and len(blocks) == 2
    for name in SHIPPED:
        manifest = json.loads((MODELS_DIR / name / "bundle.json").read_text())
        test = json.loads((MODELS_DIR / name / "metrics.json").read_text())["test"]
        assert f"{len(manifest['labels'])} classes: {' '.join(manifest['labels'])}" in r.output
        assert (f"accuracy {test['accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f}, "
                f"{test['n_flows']} flows") in r.output
        assert f"first {manifest['ready_packets']} relevant packets" in r.output
        assert str(MODELS_DIR / name / "README.md") in r.output


def test_a_bad_model_name_is_one_line():
    r = CliRunner().invoke(app, ["replay", str(SAMPLE), "--model", "nosuch", "--log", "-"])
    assert r.exit_code == 1
    assert "nosuch: neither a model bundle directory nor a shipped bundle" in r.stderr
    assert "Traceback" not in r.output


def test_unit_protects_home_and_system():
    """The unit reads the default model from the installed package (site-packages: readable under
    ProtectSystem=strict); ProtectHome=yes hides any checkout in a home directory, so the unit
    must not depend on one: test_wheel_installs_and_replays_without_the_source_tree shows it
    does not."""
    settings = [line.strip() for line in UNIT.read_text().splitlines()]
    assert "ProtectSystem=strict" in settings and "ProtectHome=yes" in settings
    assert not any(s.startswith(("ReadOnlyPaths", "BindReadOnlyPaths", "Environment=FLAGD_MODEL"))
                   for s in settings)  # nothing needed to reach the model


def _source_copy(dest: Path) -> Path:
    """What a build needs, copied: the build then never writes into the checkout (build/,
    egg-info) that other test runs may be using."""
    for name in ("pyproject.toml", "README.md", "MANIFEST.in"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "flagd", dest / "flagd",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _build_isolation() -> list[str]:
    """Build with the installed setuptools when it can (no index needed): pyproject asks for 68,
    and before 70.1 bdist_wheel came from the `wheel` package. Else pip fetches what it needs."""
    import importlib.util

    try:
        import setuptools
    except ImportError:
        return []
    version = tuple(int(x) for x in setuptools.__version__.split(".")[:2] if x.isdigit())
    if version >= (70, 1) or (version >= (68,) and importlib.util.find_spec("wheel")):
        return ["--no-build-isolation"]
    return []


@pytest.mark.slow
def test_wheel_installs_and_replays_without_the_source_tree(tmp_path):
    """Build the wheel, install it (non-editable) in a fresh venv, and replay the sample capture
    with the default model from a directory outside the checkout, with the checkout itself made
    invisible and / read-only (ProtectHome=yes / ProtectSystem=strict, as the unit runs it)."""
    (tmp_path / "src").mkdir()
    src = _source_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *_build_isolation(),
                        str(src), "-w", str(dist)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = dist.glob("flagd-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for name in SHIPPED:
            for f in BUNDLE_FILES:
                info = z.getinfo(f"flagd/models/{name}/{f}")
                assert info.file_size == (MODELS_DIR / name / f).stat().st_size
        assert "flagd/schema/events.json" in names
        assert not any(n.startswith("models/") for n in names)  # only inside the package
    print(f"wheel {wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB")

    venv = tmp_path / "venv"
    # System site-packages: torch and the other dependencies come from this environment (a
    # resolver must never fetch torch); pip too, so the venv needs none of its own.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                        "--ignore-installed", str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    work = tmp_path / "elsewhere"  # not the checkout: `import flagd` must not find the source tree
    work.mkdir()
    sample = shutil.copy(SAMPLE, work / "sample.pcap")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FLAGD_MODEL")}
    probe = subprocess.run([str(py), "-c", "import flagd.infer as i; print(i.__file__); "
                            "print(i.default_model())"], cwd=work, env=env, capture_output=True,
                           text=True, timeout=300, check=True)
    code_path, model_path = map(Path, probe.stdout.split())
    assert code_path.is_relative_to(venv) and model_path.is_relative_to(venv), probe.stdout
    assert model_path == code_path.parent / "models" / "iscx-vpn2016"

    flagd = venv / "bin" / "flagd"
    listing = subprocess.run([str(flagd), "models"], cwd=work, env=env, capture_output=True,
                             text=True, timeout=300)
    assert listing.returncode == 0, listing.stderr
    assert str(code_path.parent / "models" / "lab12" / "README.md") in listing.stdout

    # ProtectHome=yes makes /home and /run/user empty; the checkout (wherever it is) goes too.
    # /root stays: this interpreter lives there (on a real system it is /usr's python3).
    hide = [str(REPO)] + [d for d in ("/home", "/run/user") if os.path.isdir(d)]
    script = ('set -e; for d in "$@"; do mount -t tmpfs -o mode=000 none "$d"; done; '
              'mount -o remount,bind,ro /; '
              f'exec "{flagd}" replay "{sample}" --log - --no-dashboard --stats-interval 0')
    if shutil.which("unshare") and os.geteuid() == 0:
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *hide]
    else:  # no mount namespace here: the same replay, the checkout merely elsewhere
        argv = [str(flagd), "replay", str(sample), "--log", "-", "--no-dashboard",
                "--stats-interval", "0"]
    r = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    events = [json.loads(x) for x in r.stdout.splitlines()]
    flows = [e for e in events if e["event_type"] == "flow"]
    cls = {e["flow_id"]: e for e in events if e["event_type"] == "classification"}
    assert len(flows) == 9  # 7 TLS connections and 2 UDP exchanges
    for f in flows:
        assert cls[f["flow_id"]]["flag"]["model"] == "iscx-vpn2016"
        assert f["flag"]["label"] == cls[f["flow_id"]]["flag"]["label"]


def test_readme_test_command_is_what_ci_runs():
    """CI runs exactly the README's test command (its apt-get line names logrotate, for
    tests/test_logrotate.py)."""
    readme = [line for line in (REPO / "README.md").read_text().splitlines()
              if line.startswith("apt-get update")]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.startswith("apt-get update")]
    assert len(readme) == 1 and readme == ci
    assert " logrotate " in readme[0]
