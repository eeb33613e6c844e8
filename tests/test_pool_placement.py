"""Placement in a pool: rendezvous hashing of models, least-loaded sessions, pool addresses."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from djinn.pool.directory import StaticDirectory, directory_for
from djinn.pool.placement import PlacementPolicy, least_loaded, model_holders

SERVERS = [f"127.0.0.1:{6000 + i}" for i in range(4)]
FINGERPRINTS = [f"{i:032x}" for i in range(200)]


def test_every_server_holds_a_model_by_default():
    assert sorted(model_holders(FINGERPRINTS[0], SERVERS, None)) == sorted(SERVERS)


def test_holders_do_not_depend_on_the_order_servers_are_listed_in():
    for fingerprint in FINGERPRINTS[:20]:
        assert model_holders(fingerprint, SERVERS, 2) == model_holders(fingerprint, SERVERS[::-1], 2)


def test_single_replicas_spread_over_the_pool():
    counts = Counter(model_holders(f, SERVERS, 1)[0] for f in FINGERPRINTS)
    assert set(counts) == set(SERVERS)
    assert min(counts.values()) > len(FINGERPRINTS) / len(SERVERS) / 2


def test_a_lost_server_moves_only_the_models_it_held():
    before = {f: model_holders(f, SERVERS, 1)[0] for f in FINGERPRINTS}
    after = {f: model_holders(f, SERVERS[1:], 1)[0] for f in FINGERPRINTS}
    moved = {f for f in FINGERPRINTS if before[f] != after[f]}
    assert moved == {f for f in FINGERPRINTS if before[f] == SERVERS[0]}


def test_replicas_are_a_prefix_of_the_ranking():
    for fingerprint in FINGERPRINTS[:20]:
        assert model_holders(fingerprint, SERVERS, 3)[:2] == model_holders(fingerprint, SERVERS, 2)


@pytest.mark.parametrize("replicas", [0, -1, 1.5, True, "2"])
def test_bad_replica_counts_are_refused(replicas):
    with pytest.raises(ValueError, match="replicas"):
        PlacementPolicy(replicas)


def test_no_server_no_holder():
    with pytest.raises(ValueError, match="no live server"):
        model_holders(FINGERPRINTS[0], [], None)


def test_least_loaded_takes_the_fewest_sessions():
    assert least_loaded({"a": 3, "b": 1, "c": 2}, random.Random(0)) == "b"


def test_least_loaded_breaks_ties_at_random_over_the_tie():
    picks = Counter(least_loaded({"a": 1, "b": 1, "c": 5}, random.Random(seed)) for seed in range(200))
    assert set(picks) == {"a", "b"} and min(picks.values()) > 50


def test_least_loaded_needs_a_server():
    with pytest.raises(ValueError, match="no server"):
        least_loaded({}, random.Random(0))


@pytest.mark.parametrize("address, members", [
    (["h1:1", "h2:2"], ("h1:1", "h2:2")),
    ("h1:1,h2:2", ("h1:1", "h2:2")),
    ("h1:1, h2:2 ,h3:3", ("h1:1", "h2:2", "h3:3")),
    (("h1:1",), ("h1:1",)),
])
def test_pool_addresses(address, members):
    assert directory_for(address) == StaticDirectory(members)


def test_one_address_is_one_server():
    assert directory_for("127.0.0.1:5556") is None


@pytest.mark.parametrize("address, message", [
    ([], "at least one"), ("h1:1,", "at least one"), (["h1:1", "h1:1"], "each server once")])
def test_bad_pool_addresses_say_what_is_wrong(address, message):
    with pytest.raises(ValueError, match=message):
        directory_for(address)
