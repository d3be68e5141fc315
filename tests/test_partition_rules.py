"""testbed.emulation.links.partition_rules: which hosts' netfilter rules cut a partition (the
cut itself, on Mininet hosts, is tests/test_faults.py's)."""

from __future__ import annotations

from testbed.emulation.links import partition_rules

HOSTS = ["dispatcher", "edge1", "edge2", "edge3", "edge4"]


def ip(host: str) -> str:
    return f"10.0.0.{HOSTS.index(host) + 1}"


def test_the_smaller_side_drops_both_ways_and_the_other_needs_no_rule() -> None:
    rules = partition_rules(HOSTS, [(frozenset({"edge1", "edge2", "edge3", "edge4"}),
                                     frozenset({"dispatcher"}))], ip)
    assert rules["dispatcher"] == [f"{flag} {ip(h)} -j DROP" for h in
                                   ("edge1", "edge2", "edge3", "edge4") for flag in ("-s", "-d")]
    assert all(rules[h] == [] for h in HOSTS if h != "dispatcher")


def test_overlapping_partitions_add_up_and_equal_sides_guard_the_first() -> None:
    edge3 = frozenset({"edge3"})
    rules = partition_rules(HOSTS, [(edge3, frozenset({"edge4"})),
                                    (frozenset({"edge1", "edge2"}), edge3 | {"edge4"})], ip)
    assert rules["edge3"] == [f"-s {ip('edge4')} -j DROP", f"-d {ip('edge4')} -j DROP"]
    assert rules["edge1"] == rules["edge2"] == [
        f"{flag} {ip(h)} -j DROP" for h in ("edge3", "edge4") for flag in ("-s", "-d")]
    assert rules["edge4"] == rules["dispatcher"] == []
    # healed: every chain empty again
    assert set(map(tuple, partition_rules(HOSTS, [], ip).values())) == {()}
