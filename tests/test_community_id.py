"""Community ID v1 on flow and classification events: the specification's published test vectors,
agreement with the reference implementation (the `communityid` package), and the events
themselves (direction-independent, seed from flagd.toml, schema-valid, absent when anonymized)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from flagd.cli import app
from flagd.daemon import RunConfig
from flagd.events import EventHeader, community_id, flow_event, schema
from flagd.flows import Expiry, Flow, FlowSettings

SAMPLE = Path(__file__).parent / "data" / "lab-tls.pcap"

V6A = "fe80:0001:0203:0405:0607:0809:0A0B:0C0D"
V6B = "fe80:1011:1213:1415:1617:1819:1A1B:1C1D"

# github.com/corelight/community-id-spec, baseline/README.md: the tables for the default seed
# and for seed 1 (ICMP rows left out: flagd meters TCP and UDP only and refuses ICMP).
SPEC_TABLE = [
    # (proto, src, dst, sport, dport, seed 0, seed 1)
    (6, "1.2.3.4", "5.6.7.8", 1122, 3344, "1:wCb3OG7yAFWelaUydu0D+125CLM=", "1:HhA1B+6CoLbiKPEs5nhNYN4XWfk="),
    (6, "5.6.7.8", "1.2.3.4", 3344, 1122, "1:wCb3OG7yAFWelaUydu0D+125CLM=", "1:HhA1B+6CoLbiKPEs5nhNYN4XWfk="),
    (17, "1.2.3.4", "5.6.7.8", 1122, 3344, "1:0Mu9InQx6z4ZiCZM/7HXi2WMhOg=", "1:OShq+iKDAMVouh/4bMxB9Sz4amw="),
    (17, "5.6.7.8", "1.2.3.4", 3344, 1122, "1:0Mu9InQx6z4ZiCZM/7HXi2WMhOg=", "1:OShq+iKDAMVouh/4bMxB9Sz4amw="),
    (132, "1.2.3.4", "5.6.7.8", 1122, 3344, "1:EKt4MsxuyaE6mL+hmrEkQ9csDD8=", "1:uitchpn5MMGAQKBJh7bIr/bAr7s="),
    (132, "5.6.7.8", "1.2.3.4", 3344, 1122, "1:EKt4MsxuyaE6mL+hmrEkQ9csDD8=", "1:uitchpn5MMGAQKBJh7bIr/bAr7s="),
    (46, "1.2.3.4", "5.6.7.8", None, None, "1:ikv3kmf89luf73WPz1jOs49S768=", "1:/buhqeOmaRCopOZFy9HnoJd5XW8="),
    (46, "5.6.7.8", "1.2.3.4", None, None, "1:ikv3kmf89luf73WPz1jOs49S768=", "1:/buhqeOmaRCopOZFy9HnoJd5XW8="),
    (46, V6A, V6B, None, None, "1:wQ/2mwrnXP4lmJcHdGL5ePjR+e0=", "1:j6EyyfBzL4vWKHFXgUqb5Az3OxM="),
    (46, V6B, V6A, None, None, "1:wQ/2mwrnXP4lmJcHdGL5ePjR+e0=", "1:j6EyyfBzL4vWKHFXgUqb5Az3OxM="),
]

# baseline/baseline_deflt.json (seed 0): the flows of the spec's pcaps that are not ICMP.
SPEC_BASELINE = [
    (6, "2001:470:e5bf:dead:4957:2174:e82c:4887", "2607:f8b0:400c:c03::1a", 63943, 25, "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4="),
    (6, "2607:f8b0:400c:c03::1a", "2001:470:e5bf:dead:4957:2174:e82c:4887", 25, 63943, "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4="),
    (132, "192.168.170.8", "192.168.170.56", 7, 7, "1:MP2EtRCAUIZvTw6MxJHLV7N7JDs="),
    (132, "192.168.170.56", "192.168.170.8", 7, 7, "1:MP2EtRCAUIZvTw6MxJHLV7N7JDs="),
    (6, "128.232.110.120", "66.35.250.204", 34855, 80, "1:LQU9qZlK+B5F3KDmev6m5PMibrg="),
    (6, "66.35.250.204", "128.232.110.120", 80, 34855, "1:LQU9qZlK+B5F3KDmev6m5PMibrg="),
    (17, "192.168.1.52", "8.8.8.8", 54585, 53, "1:d/FP5EW3wiY1vCndhwleRRKHowQ="),
    (17, "8.8.8.8", "192.168.1.52", 53, 54585, "1:d/FP5EW3wiY1vCndhwleRRKHowQ="),
    (46, "10.1.12.1", "10.1.12.2", None, None, "1:KHlLkgoJW7ifUTyTSgyVfkFHzKw="),
    (46, "10.1.12.2", "10.1.12.1", None, None, "1:KHlLkgoJW7ifUTyTSgyVfkFHzKw="),
]


def packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


@pytest.mark.parametrize("proto,src,dst,sport,dport,seed0,seed1", SPEC_TABLE)
def test_the_specifications_tables(proto, src, dst, sport, dport, seed0, seed1):
    assert community_id(packed(src), packed(dst), proto, sport, dport) == seed0
    assert community_id(packed(src), packed(dst), proto, sport, dport, seed=1) == seed1


@pytest.mark.parametrize("proto,src,dst,sport,dport,expected", SPEC_BASELINE)
def test_the_specifications_baseline(proto, src, dst, sport, dport, expected):
    assert community_id(packed(src), packed(dst), proto, sport, dport) == expected


def test_icmp_and_bad_seeds_are_refused():
    a, b = packed("1.2.3.4"), packed("5.6.7.8")
    with pytest.raises(ValueError, match="ICMP"):
        community_id(a, b, 1, 8, 0)
    with pytest.raises(ValueError, match="16-bit"):
        community_id(a, b, 6, 1, 2, seed=65536)
    for bad in (-1, 65536, "1", 1.0, True):
        with pytest.raises(ValueError, match="community_id_seed"):
            EventHeader(community_id_seed=bad)


addresses_v4 = st.ip_addresses(v=4).map(str)
addresses_v6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@settings(max_examples=300, deadline=None)
@given(proto=st.sampled_from([6, 17, 132]), pair=st.one_of(st.tuples(addresses_v4, addresses_v4),
       st.tuples(addresses_v6, addresses_v6)), sport=ports, dport=ports, seed=st.integers(0, 65535),
       same_address=st.booleans())
def test_agrees_with_the_reference_implementation(proto, pair, sport, dport, seed, same_address):
    """Random flows (equal addresses too, where the ports decide the order) against pycommunityid."""
    communityid = pytest.importorskip("communityid")  # the `test` extra installs it
    src, dst = (pair[0], pair[0]) if same_address else pair
    ref = communityid.CommunityID(seed=seed).calc(communityid.FlowTuple(proto, src, dst, sport, dport))
    ours = community_id(packed(src), packed(dst), proto, sport, dport, seed)
    assert ours == ref
    assert community_id(packed(dst), packed(src), proto, dport, sport, seed) == ours  # both ways


def make_flow(client: str, server: str, cport: int, sport: int, proto: int = 6) -> Flow:
    c, s = ipaddress.ip_address(client), ipaddress.ip_address(server)
    return Flow(key=b"k", flow_id=1, version=c.version, proto=proto,
                client=c.packed.ljust(16, b"\0"), server=s.packed.ljust(16, b"\0"),
                client_port=cport, server_port=sport, start=1.0, last=2.0, client_is_high=False,
                pkts_toserver=1, expiry=Expiry.IDLE)


def test_flow_event_carries_the_community_id_and_validates():
    import jsonschema

    for client, server in (("1.2.3.4", "5.6.7.8"), (V6B, V6A)):
        ev = flow_event(make_flow(client, server, 1122, 3344), None)
        assert ev["community_id"] == community_id(packed(client), packed(server), 6, 1122, 3344)
        jsonschema.validate(ev, schema())
    ev = flow_event(make_flow("1.2.3.4", "5.6.7.8", 1122, 3344), None, EventHeader(community_id_seed=1))
    assert ev["community_id"] == "1:HhA1B+6CoLbiKPEs5nhNYN4XWfk="  # the spec's seed-1 vector
    assert list(ev)[:9] == ["timestamp", "event_type", "flow_id", "src_ip", "src_port", "dest_ip",
                            "dest_port", "proto", "community_id"]  # where Suricata's EVE has it
    bad = dict(ev, community_id="1:not-base64")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema())


def test_config_key_reaches_the_event_header(tmp_path):
    cfg = tmp_path / "flagd.toml"
    cfg.write_text("community_id_seed = 4242\n")
    settings_ = RunConfig.load(cfg).pipeline_settings(FlowSettings())
    assert settings_.header.community_id_seed == 4242
    assert RunConfig.load(None).pipeline_settings(FlowSettings()).header.community_id_seed == 0
    cfg.write_text("community_id_seed = 70000\n")
    with pytest.raises(ValueError, match="community_id_seed"):
        RunConfig.load(cfg).pipeline_settings(FlowSettings())


def replay(tmp_path, bundle, config: str, name: str) -> list[dict]:
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(config)
    log = tmp_path / f"{name}.jsonl"
    r = CliRunner().invoke(app, ["replay", str(SAMPLE), "--model", str(bundle), "--log", str(log),
                                 "--no-dashboard", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    return [json.loads(x) for x in log.read_text().splitlines()]


def test_replayed_events_carry_the_seeded_community_id(tmp_path, tiny_bundle):
    """Every flow and classification event of a real capture: the ID of its own 5-tuple with the
    configured seed, the same on a flow's classification and flow events, schema-valid."""
    import jsonschema

    events = replay(tmp_path, tiny_bundle, "community_id_seed = 7\n", "seed7")
    flows = [e for e in events if e["event_type"] == "flow"]
    classes = [e for e in events if e["event_type"] == "classification"]
    assert len(flows) == 9 and classes
    by_flow = {}
    for e in flows + classes:
        proto = {"TCP": 6, "UDP": 17}[e["proto"]]
        expected = community_id(packed(e["src_ip"]), packed(e["dest_ip"]), proto, e["src_port"],
                                e["dest_port"], seed=7)
        assert e["community_id"] == expected
        by_flow.setdefault(e["flow_id"], set()).add(e["community_id"])
        jsonschema.validate(e, schema())
    assert all(len(ids) == 1 for ids in by_flow.values())
    assert len({next(iter(ids)) for ids in by_flow.values()}) == len(flows)  # one ID per flow
    default = replay(tmp_path, tiny_bundle, "", "seed0")
    assert {e["flow_id"]: e["community_id"] for e in default if "community_id" in e}.keys() == by_flow.keys()
    assert not {e["community_id"] for e in default if "community_id" in e} & {
        e["community_id"] for e in flows}  # the seed changes every ID


def test_anonymized_events_carry_no_community_id(tmp_path, tiny_bundle):
    events = replay(tmp_path, tiny_bundle, 'anonymize = true\nanonymize_key = "k"\n', "anon")
    assert any(e["event_type"] == "flow" for e in events)
    assert not any("community_id" in e for e in events)
