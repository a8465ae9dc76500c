"""Privacy option: keyed-hash pseudonyms instead of addresses in every event, key from the config."""

from __future__ import annotations

import hashlib
import hmac
import json

from typer.testing import CliRunner

from flagd.cli import app
from tests import floodgen


def replay(tmp_path, bundle, config: str, name: str) -> tuple[int, str, list[dict]]:
    cap = tmp_path / "flows.pcap"
    if not cap.exists():
        floodgen.write_flood(cap, "random", 600, real_flows=5)
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(config)
    log = tmp_path / f"{name}.jsonl"
    r = CliRunner().invoke(app, ["replay", str(cap), "--model", str(bundle), "--log", str(log),
                                 "--no-dashboard", "--config", str(cfg)])
    events = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    return r.exit_code, r.stderr, events


def test_events_carry_keyed_pseudonyms_and_no_address(tmp_path, tiny_bundle):
    code, err, plain = replay(tmp_path, tiny_bundle, "", "plain")
    assert code == 0, err
    code, err, anon = replay(tmp_path, tiny_bundle, 'anonymize = true\nanonymize_key = "k1"\n', "k1")
    assert code == 0, err
    code, err, other = replay(tmp_path, tiny_bundle, 'anonymize = true\nanonymize_key = "k2"\n', "k2")
    assert code == 0, err
    addresses = {e[k] for e in plain if "src_ip" in e for k in ("src_ip", "dest_ip")}
    assert len(addresses) > 100
    text = "\n".join(json.dumps(e) for e in anon)
    assert not any(a in text for a in addresses if a.count(".") == 3 and len(a) >= 9)
    expected = {a: "anon-" + hmac.new(b"k1", a.encode(), hashlib.sha256).hexdigest()[:16]
                for a in addresses}
    # the same events in the same order, with every address replaced by its pseudonym
    flows = [e for e in plain if e["event_type"] == "flow"]
    anon_flows = [e for e in anon if e["event_type"] == "flow"]
    assert len(flows) == len(anon_flows) == 605
    by_id = {e["flow_id"]: e for e in anon_flows}
    for e in flows:
        a = by_id[e["flow_id"]]
        assert (a["src_ip"], a["dest_ip"]) == (expected[e["src_ip"]], expected[e["dest_ip"]])
        assert (a["src_port"], a["dest_port"]) == (e["src_port"], e["dest_port"])
    cls = [e for e in anon if e["event_type"] == "classification"]
    assert cls and all(e["src_ip"].startswith("anon-") for e in cls)
    # another key, other pseudonyms: they cannot be joined across deployments
    k2 = {e["flow_id"]: e["src_ip"] for e in other if e["event_type"] == "flow"}
    assert all(k2[i] != by_id[i]["src_ip"] for i in k2)


def test_anonymize_without_a_key_is_refused_in_one_line(tmp_path, tiny_bundle):
    code, err, events = replay(tmp_path, tiny_bundle, "anonymize = true\n", "nokey")
    assert code == 1 and "anonymize_key" in err and err.strip().count("\n") == 0
    assert events == []


def test_anonymize_flag_takes_the_key_from_the_config(tmp_path, tiny_bundle):
    cap = tmp_path / "flows.pcap"
    floodgen.write_flood(cap, "random", 600, real_flows=5)
    cfg = tmp_path / "key.toml"
    cfg.write_text('anonymize_key = "k1"\n')
    log = tmp_path / "flag.jsonl"
    r = CliRunner().invoke(app, ["replay", str(cap), "--model", str(tiny_bundle), "--log", str(log),
                                 "--config", str(cfg), "--anonymize"])
    assert r.exit_code == 0, r.stderr
    events = [json.loads(x) for x in log.read_text().splitlines()]
    flows = [e for e in events if e["event_type"] == "flow"]
    assert flows and all(e["src_ip"].startswith("anon-") and e["dest_ip"].startswith("anon-") for e in flows)
