"""Model bundles from an untrusted place: tampered, truncated, swapped or booby-trapped files are
refused with one line naming the file, and loading never runs code from a pickle."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from flagd.infer import Bundle, BundleError
from flagd.phrases import PhraseDict


@pytest.fixture
def bundle(tiny_bundle, tmp_path) -> Path:
    """A private copy of the tiny bundle that a test may damage."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def manifest(b: Path) -> dict:
    return json.loads((b / "bundle.json").read_text())


def rehash(b: Path, *names: str) -> None:
    """What an attacker who can write the bundle does: update the manifest to match."""
    m = manifest(b)
    for name in names:
        m["files"][name] = hashlib.sha256((b / name).read_bytes()).hexdigest()
    (b / "bundle.json").write_text(json.dumps(m))


def refused(b: Path) -> str:
    with pytest.raises(BundleError) as e:
        Bundle.load(b, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_intact_bundle_loads_and_lists_every_file(bundle):
    files = manifest(bundle)["files"]
    assert {"model.pt", "phrases.json"} <= set(files)
    assert all(len(d) == 64 for d in files.values())
    assert set(files) == {p.name for p in bundle.iterdir()} - {"bundle.json"}
    Bundle.load(bundle, device="cpu")


@pytest.mark.parametrize("name", ["model.pt", "phrases.json", "metrics.json"])
def test_one_flipped_byte_is_refused_naming_the_file(bundle, name):
    data = bytearray((bundle / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / name).write_bytes(bytes(data))
    msg = refused(bundle)
    assert str(bundle / name) in msg and "SHA-256" in msg


@pytest.mark.parametrize("name", ["model.pt", "phrases.json"])
def test_truncated_file_is_refused_naming_the_file(bundle, name):
    data = (bundle / name).read_bytes()
    (bundle / name).write_bytes(data[: len(data) // 3])
    msg = refused(bundle)
    assert str(bundle / name) in msg and "truncated" in msg


def test_missing_file_is_refused_naming_it(bundle):
    (bundle / "phrases.json").unlink()
    assert str(bundle / "phrases.json") in refused(bundle)


def test_manifest_must_cover_the_model_and_dictionary(bundle):
    """Dropping model.pt from the manifest must not turn its check off."""
    m = manifest(bundle)
    del m["files"]["model.pt"]
    (bundle / "bundle.json").write_text(json.dumps(m))
    msg = refused(bundle)
    assert "model.pt" in msg and "manifest" in msg


@pytest.mark.parametrize("name", ["../../etc/hostname", "/etc/hostname", "sub/../model.pt"])
def test_manifest_names_outside_the_bundle_are_refused(bundle, name):
    m = manifest(bundle)
    m["files"][name] = "0" * 64
    (bundle / "bundle.json").write_text(json.dumps(m))
    assert name in refused(bundle)


@pytest.mark.parametrize("text", ["", "not json", "[]", '{"format": "flagd-model", "version": 1}',
                                  '{"format": "flagd-model", "version": 1, "files": "x"}'])
def test_broken_manifest_is_a_bundle_error_not_a_crash(bundle, text):
    (bundle / "bundle.json").write_text(text)
    assert "bundle.json" in refused(bundle)


class _Boom:
    """Unpickling this calls os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_never_run_even_with_a_matching_manifest(bundle, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = torch.load(bundle / "model.pt", weights_only=True)
    ckpt["extra"] = _Boom(marker)
    torch.save(ckpt, bundle / "model.pt")
    rehash(bundle, "model.pt")
    msg = refused(bundle)
    assert str(bundle / "model.pt") in msg and "not a loadable checkpoint" in msg
    assert not marker.exists(), "loading the bundle ran code from the pickle"
    # the same payload as a bare pickle (not a torch zip file)
    (bundle / "model.pt").write_bytes(pickle.dumps(_Boom(marker)))
    rehash(bundle, "model.pt")
    assert str(bundle / "model.pt") in refused(bundle)
    assert not marker.exists()


def test_a_dictionary_the_model_was_not_trained_with_is_refused(bundle):
    other = PhraseDict.fit([b"\x17\x03\x03" * 200, bytes(range(200)) * 3], 400)
    other.save(bundle / "phrases.json")
    rehash(bundle, "phrases.json")  # the manifest agrees: only the model's own record catches it
    msg = refused(bundle)
    assert str(bundle / "phrases.json") in msg and "differs" in msg


def test_cli_refuses_a_tampered_bundle_with_one_line(bundle, tmp_path):
    from typer.testing import CliRunner

    from flagd.cli import app
    from tests import crafted

    cap = crafted.write_pcap(tmp_path / "one.pcap", [crafted.Record(1.0, crafted.ether(crafted.tcp4()))], 1)
    data = bytearray((bundle / "model.pt").read_bytes())
    data[-10] ^= 0xFF
    (bundle / "model.pt").write_bytes(bytes(data))
    r = CliRunner().invoke(app, ["replay", str(cap), "--model", str(bundle), "--log",
                                 str(tmp_path / "ev.jsonl"), "--no-dashboard"])
    assert r.exit_code == 1
    assert r.stderr.strip().count("\n") == 0 and "model.pt" in r.stderr and "SHA-256" in r.stderr
    assert not (tmp_path / "ev.jsonl").exists()  # refused before anything ran
