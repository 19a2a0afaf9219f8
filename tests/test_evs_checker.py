"""The EVS checker: each property on a history that keeps it and on a minimal mutation that breaks it."""

from __future__ import annotations

import re

import pytest

from groupcomm.errors import EVSViolation
from groupcomm.events import Configuration, Crashed, Delivery, RingId
from groupcomm.testing.evs import SendRecord, check_evs, evs_violations

CRASH = Crashed()


def reg(rep: int, seq: int, *members: int) -> Configuration:
    return Configuration(RingId(rep, seq), members, False)


def trans(rep: int, seq: int, *members: int) -> Configuration:
    return Configuration(RingId(rep, seq), members, True)


def sent(sender: int, payload: bytes, *, safe: bool = False, inc: int = 0) -> SendRecord:
    return SendRecord(sender, inc, payload, safe)


def dlv(send: SendRecord) -> Delivery:
    return Delivery(send.sender, send.payload, send.safe)


# ------------------------------------------------------------------ scenarios
# Each returns fresh (histories, sends) that the tests mutate.

R1 = reg(1, 4, 1, 2, 3)
T2 = trans(1, 8, 1, 2)
R2 = reg(1, 8, 1, 2)


def three_nodes_node3_crashes():
    """Nodes 1-3 in ring 1:4; node 3 crashes; 1 and 2 go through a transitional config to 1:8."""
    a, b, c = sent(1, b"a"), sent(2, b"b"), sent(3, b"c")
    s = sent(1, b"s", safe=True)  # safe, delivered before node 3 could: 3 crashed, so not owed
    d = sent(3, b"d")  # node 3's last message, recovered in the transitional config
    e, f = sent(1, b"e"), sent(2, b"f", safe=True)
    survivor = [R1, dlv(a), dlv(b), dlv(c), dlv(s), T2, dlv(d), R2, dlv(e), dlv(f)]
    histories = {
        1: list(survivor),
        2: list(survivor),
        3: [R1, dlv(a), dlv(b), dlv(c), CRASH],
    }
    return histories, [a, b, c, s, d, e, f]


A = reg(1, 4, 1, 2, 3, 4)
LEFT_T, LEFT = trans(1, 8, 1, 2), reg(1, 8, 1, 2)
RIGHT_T, RIGHT = trans(3, 8, 3, 4), reg(3, 8, 3, 4)
MERGED_T_LEFT, MERGED_T_RIGHT = trans(1, 12, 1, 2), trans(1, 12, 3, 4)
MERGED = reg(1, 12, 1, 2, 3, 4)


def partition_and_merge():
    """Four nodes split into {1,2} and {3,4}, then merge: two transitionals with ring id 1:12."""
    m1 = sent(1, b"m1")
    l1 = sent(1, b"l1", safe=True)
    r1 = sent(4, b"r1")
    x1, x2 = sent(2, b"x1"), sent(3, b"x2", safe=True)
    left = [A, dlv(m1), LEFT_T, LEFT, dlv(l1), MERGED_T_LEFT, MERGED, dlv(x1), dlv(x2)]
    right = [A, dlv(m1), RIGHT_T, RIGHT, dlv(r1), MERGED_T_RIGHT, MERGED, dlv(x1), dlv(x2)]
    histories = {1: list(left), 2: list(left), 3: list(right), 4: list(right)}
    return histories, [m1, l1, r1, x1, x2]


RING = reg(1, 4, 1, 2)
ALONE_T, ALONE = trans(1, 8, 1), reg(1, 8, 1)
REJOIN_T, REJOINED = trans(1, 12, 1), reg(1, 12, 1, 2)


def restart_with_repeated_payloads():
    """Node 1 sends b"x" twice (agreed then safe); node 2 crashes, restarts and rejoins."""
    x_agreed, x_safe = sent(1, b"x"), sent(1, b"x", safe=True)
    y = sent(2, b"y")
    z = sent(2, b"z", inc=1)  # from node 2's second life
    w = sent(1, b"w")
    histories = {
        1: [RING, dlv(x_agreed), dlv(x_safe), dlv(y), ALONE_T, ALONE, REJOIN_T, REJOINED, dlv(z), dlv(w)],
        2: [RING, dlv(x_agreed), dlv(x_safe), dlv(y), CRASH, REJOINED, dlv(z), dlv(w)],
    }
    return histories, [x_agreed, x_safe, y, z, w]


SCENARIOS = [three_nodes_node3_crashes, partition_and_merge, restart_with_repeated_payloads]


def violates(prop: str, histories, sends, **kwargs) -> str:
    """Assert the run breaks ``prop``; return the report."""
    with pytest.raises(EVSViolation, match=prop) as info:
        check_evs(histories, sends, **kwargs)
    return str(info.value)


# --------------------------------------------------------------- clean runs


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("settled", [False, True])
def test_clean_scenarios_pass(scenario, settled):
    histories, sends = scenario()
    check_evs(histories, sends, settled=settled)
    assert evs_violations(histories, sends, settled=settled) == []


def test_default_live_excludes_nodes_whose_last_incarnation_crashed():
    histories, sends = three_nodes_node3_crashes()
    # Node 3 is down, so it is neither owed the final configuration nor its own messages.
    check_evs(histories, sends, settled=True)
    check_evs(histories, sends, settled=True, live={1, 2})


# ------------------------------------------------------------ 1: no creation


def test_no_creation_delivery_of_unsent_payload():
    histories, sends = three_nodes_node3_crashes()
    histories[2].insert(2, Delivery(1, b"ghost", False))
    report = violates("no creation", histories, sends)
    assert "node 2/inc 0" in report and "b'ghost'" in report


def test_no_creation_delivery_with_wrong_safe_flag():
    histories, sends = restart_with_repeated_payloads()
    # Occurrence matching: node 2's first b"x" is the agreed send, the second the safe one.
    histories[2][1], histories[2][2] = Delivery(1, b"x", True), Delivery(1, b"x", False)
    violates("no creation", histories, sends)


def test_no_creation_from_a_sender_that_never_sent_that_payload():
    histories, sends = partition_and_merge()
    histories[1][1] = Delivery(2, b"m1", False)  # right payload, wrong sender
    violates("no creation", histories, sends)


# --------------------------------------------------------- 2: no duplication


def test_repeated_payloads_are_matched_by_occurrence():
    histories, sends = restart_with_repeated_payloads()
    assert sends[0].payload == sends[1].payload
    check_evs(histories, sends, settled=True)


def test_no_duplication_within_one_incarnation():
    histories, sends = restart_with_repeated_payloads()
    histories[1].insert(3, Delivery(1, b"x", False))  # a third b"x", only two were sent
    violates("no duplication", histories, sends)


def test_no_duplication_across_incarnations():
    histories, sends = restart_with_repeated_payloads()
    y = sends[2]
    histories[2].insert(6, dlv(y))  # node 2's second life delivers y, already delivered before the crash
    report = violates("no duplication", histories, sends)
    assert "in incarnation 0 at histories[2][3]" in report
    assert "in incarnation 1 at histories[2][6]" in report


# ---------------------------------------------------------- 3: per-sender FIFO


def test_per_sender_fifo_violated_when_everyone_swaps_two_messages_of_one_sender():
    histories, sends = three_nodes_node3_crashes()
    for node in (1, 2):
        h = histories[node]
        h[1], h[4] = h[4], h[1]  # node 1's a and s, in the opposite order everywhere
    histories[3] = [R1, CRASH]  # keep node 3 out of the total order
    report = violates("per-sender FIFO", histories, sends)
    assert "total order" not in report


def test_fifo_is_per_sender_so_other_senders_may_interleave():
    histories, sends = three_nodes_node3_crashes()
    for node in (1, 2, 3):
        h = histories[node]
        h[2], h[3] = h[3], h[2]  # b (node 2) and c (node 3): different senders
    check_evs(histories, sends, settled=True)


# -------------------------------------------------------------- 4: total order


def test_total_order_violated_by_two_nodes_disagreeing():
    histories, sends = three_nodes_node3_crashes()
    h = histories[2]
    h[1], h[2] = h[2], h[1]  # node 2 delivers b before a; nodes 1 and 3 deliver a before b
    report = violates("total order", histories, sends)
    assert "delivered #1" in report and "before #0" in report
    assert "delivered #0" in report and "before #1" in report
    assert "per-sender FIFO" not in report


def test_total_order_reports_a_short_cycle_among_many_messages():
    msgs = [sent(1 + i % 2, f"m{i}".encode()) for i in range(200)]
    order = [dlv(m) for m in msgs]
    swapped = list(order)
    swapped[100], swapped[101] = swapped[101], swapped[100]
    ring = reg(1, 4, 1, 2)
    report = violates("total order", {1: [ring, *order], 2: [ring, *swapped]}, msgs)
    assert "has 2 message(s)" in report


def test_total_order_holds_across_partitions_with_disjoint_messages():
    histories, sends = partition_and_merge()
    check_evs(histories, sends)  # l1 and r1 are never both delivered by one node


# -------------------------------------------------- 5: configuration consistency


def single(*events):
    """One node (1), with sends for every payload it delivers."""
    sends = [SendRecord(e.sender, 0, e.payload, e.safe) for e in events if type(e) is Delivery]
    return {1: list(events)}, sends


@pytest.mark.parametrize(
    "events, reason",
    [
        ((reg(1, 8, 1), reg(1, 4, 1)), "does not increase"),
        ((reg(1, 4, 1), trans(1, 8, 1), reg(1, 12, 1)), "not the regular configuration 1:8"),
        ((reg(1, 4, 1), trans(1, 8, 1), trans(1, 12, 1), reg(1, 12, 1)), "not the regular configuration 1:8"),
        ((reg(1, 4, 1, 2), trans(1, 8, 1, 3), reg(1, 8, 1, 3)), "not a subset of the preceding"),
        ((reg(1, 4, 1, 2), trans(1, 8, 1, 2), reg(1, 8, 1)), "not a subset of the following"),
        ((trans(1, 4, 1), reg(1, 4, 1)), "no regular configuration before it"),
        ((Delivery(1, b"early", False), reg(1, 4, 1)), "before installing any configuration"),
        ((reg(1, 4, 2, 3),), "does not list node 1"),
        ((reg(1, 4, 1), trans(1, 8, 1, 2), reg(1, 8, 1, 2)), "not a subset of the preceding"),
        ((reg(1, 4, 1), CRASH, reg(1, 4, 1)), "already installed ring 1:4"),
    ],
    ids=[
        "regular seq decreases",
        "transitional followed by another ring",
        "two transitionals in a row",
        "transitional not within previous regular",
        "transitional not within next regular",
        "first configuration transitional",
        "delivery before any configuration",
        "not a member of own regular",
        "transitional grows the ring",
        "same regular ring twice across a restart",
    ],
)
def test_configuration_consistency_violations(events, reason):
    report = violates("configuration consistency", *single(*events))
    assert re.search(reason, report), report


def test_configuration_consistency_same_ring_different_members():
    histories, sends = partition_and_merge()
    histories[2][3] = reg(1, 8, 1, 2, 5)  # node 2's view of ring 1:8 adds a node 5
    report = violates("configuration consistency", histories, sends)
    assert "node 1/inc 0 installed ring 1:8 with members (1, 2)" in report


def test_configuration_may_end_in_a_transitional_when_the_incarnation_ends():
    check_evs(*single(reg(1, 4, 1, 2), trans(1, 8, 1), CRASH))
    check_evs(*single(reg(1, 4, 1, 2), trans(1, 8, 1)))  # still running


def test_restarted_node_may_start_in_a_ring_others_reached_through_a_transitional():
    histories, sends = restart_with_repeated_payloads()
    assert histories[2][5] is REJOINED  # first configuration of node 2's second life
    check_evs(histories, sends)


# -------------------------------------------------------- 6: virtual synchrony


def test_virtual_synchrony_violated_when_one_mover_misses_a_message_in_the_regular_config():
    histories, sends = partition_and_merge()
    del histories[3][4]  # node 3 skips r1 in ring 3:8, yet moves to 1:12 with node 4
    report = violates("virtual synchrony", histories, sends)
    assert "node 3/inc 0 and node 4/inc 0 both moved from regular 3:8 to regular 1:12" in report
    assert "only node 4/inc 0 delivered 1 message(s)" in report
    assert "b'r1'" in report


def test_virtual_synchrony_violated_in_the_transitional_config():
    histories, sends = three_nodes_node3_crashes()
    del histories[2][6]  # node 2 skips d, delivered by node 1 in the transitional config
    report = violates("virtual synchrony", histories, sends)
    assert "different messages in transitional 1:8 (1, 2)" in report


def test_virtual_synchrony_violated_by_different_transitional_members():
    histories, sends = three_nodes_node3_crashes()
    histories[2][5] = trans(1, 8, 2)
    violates("virtual synchrony", histories, sends)


def test_virtual_synchrony_allows_different_sets_when_next_configs_differ():
    histories, sends = partition_and_merge()
    for node in (3, 4):
        del histories[node][1]  # the right side never got m1 before the split
    check_evs(histories, sends)


# ------------------------------------------------ 7: delivered in one configuration


def test_same_configuration_violated_when_a_message_is_delivered_in_two_regular_rings():
    histories, sends = partition_and_merge()
    for node in (3, 4):
        h = histories[node]
        h.insert(4, h.pop(1))  # the right side delivers m1 in 3:8 instead of in 1:4
    report = violates("same configuration", histories, sends)
    assert "regular 1:4" in report and "regular 3:8" in report


def test_same_configuration_allows_delivery_in_the_transitional_config():
    histories, sends = partition_and_merge()
    for node in (3, 4):
        h = histories[node]
        h.insert(2, h.pop(1))  # the right side delivers m1 in the transitional 3:8 (3, 4)
    assert histories[3][1] is RIGHT_T
    check_evs(histories, sends)


# ------------------------------------------------------------ 8: safe delivery


def two_nodes_one_safe_message(node2_after_ring):
    """Nodes 1, 2 in 1:4; node 1 delivers safe s there; node 2's history continues as given."""
    s = sent(1, b"s", safe=True)
    histories = {
        1: [RING, dlv(s), ALONE_T, ALONE],
        2: [RING, *node2_after_ring],
    }
    return histories, [s]


def test_safe_delivery_violated_by_a_member_that_moved_on_without_it():
    # Node 2 moves to its own ring: virtual synchrony does not compare 1 and 2.
    histories, sends = two_nodes_one_safe_message([trans(2, 8, 2), reg(2, 8, 2)])
    report = violates("safe delivery", histories, sends)
    assert "virtual synchrony" not in report
    assert "member node 2/inc 0 moved on to regular 2:8 (2,)" in report


def test_safe_delivery_owed_even_if_the_member_crashed_after_moving_on():
    histories, sends = two_nodes_one_safe_message([trans(2, 8, 2), reg(2, 8, 2), CRASH])
    violates("safe delivery", histories, sends)


def test_safe_delivery_not_owed_by_a_member_that_crashed_in_the_configuration():
    histories, sends = two_nodes_one_safe_message([trans(2, 8, 2), CRASH])
    check_evs(histories, sends, settled=True)


def test_safe_delivery_waits_for_members_still_in_the_configuration_until_settled():
    for rest in ([], [trans(2, 8, 2)]):  # still in 1:4, or in the transitional after it
        histories, sends = two_nodes_one_safe_message(rest)
        check_evs(histories, sends)
        violates("safe delivery", histories, sends, settled=True)


def test_safe_delivery_in_the_transitional_config():
    c = sent(3, b"c")
    s = sent(3, b"s", safe=True)  # node 3's last message, delivered safe in the transitional 1:8
    survivor = [R1, dlv(c), T2, dlv(s), R2]
    histories = {1: list(survivor), 2: list(survivor), 3: [R1, dlv(c), CRASH]}
    check_evs(histories, [c, s], settled=True)

    histories[2] = [R1, dlv(c), T2]  # node 2 is still in the transitional config
    check_evs(histories, [c, s])
    violates("safe delivery", histories, [c, s], settled=True)

    histories[2] = [R1, dlv(c), T2, R2]  # node 2 moved on without s
    report = violates("safe delivery", histories, [c, s])
    assert "safe messages delivered in transitional 1:8 (1, 2) did not reach member node 2/inc 0" in report


# ------------------------------------------------------------ 9: self delivery


def test_self_delivery_violated_once_settled():
    histories, sends = three_nodes_node3_crashes()
    e = sends[5]
    for node in (1, 2):
        histories[node].remove(dlv(e))  # nobody, not even node 1, delivers node 1's e
    check_evs(histories, sends)  # e may still be on its way
    report = violates("self delivery", histories, sends, settled=True)
    assert "node 1/inc 0 is up and the run settled, but it never delivered 1 of its own" in report


def test_self_delivery_not_owed_by_a_crashed_sender():
    histories, sends = three_nodes_node3_crashes()
    assert sends[4].sender == 3 and dlv(sends[4]) not in histories[3]
    check_evs(histories, sends, settled=True)  # node 3 never delivered its own d


def test_self_delivery_owed_by_a_restarted_incarnation_that_has_not_delivered_yet():
    histories, sends = three_nodes_node3_crashes()
    sends.append(sent(3, b"after restart", inc=1))  # node 3's second life, nothing delivered yet
    report = violates("self delivery", histories, sends, settled=True)
    assert "node 3/inc 1" in report
    check_evs(histories, sends)


# ------------------------------------------------------------------ 10: liveness


def test_liveness_violated_when_live_nodes_end_in_different_configurations():
    histories, sends = partition_and_merge()
    histories[4] = histories[4][:5]  # node 4 never merged: still in 3:8
    check_evs(histories, sends)  # not settled: the merge may still come
    report = violates("liveness", histories, sends, settled=True)
    assert "live nodes ended in different configurations" in report


def test_liveness_violated_when_a_live_node_misses_a_message_of_the_final_configuration():
    histories, sends = partition_and_merge()
    histories[4].remove(dlv(sends[3]))  # x1, agreed
    report = violates("liveness", histories, sends, settled=True)
    assert "node 4/inc 0 did not deliver 1 message(s)" in report


def test_liveness_violated_when_final_members_are_not_the_live_nodes():
    histories, sends = three_nodes_node3_crashes()
    violates("liveness", histories, sends, settled=True, live={1})  # node 2 said down, still a member
    report = violates("liveness", histories, sends, settled=True, live={1, 2, 3})
    assert "node 3/inc 1 is live but installed no configuration" in report


# ------------------------------------------------------------------ the reports


def test_report_lists_every_violation_and_truncates_long_payloads():
    histories, sends = three_nodes_node3_crashes()
    histories[1].insert(1, Delivery(1, b"g" * 100, False))
    histories[2].insert(1, Delivery(2, b"h", False))
    found = evs_violations(histories, sends)
    assert len(found) == 2 and all(v.startswith("[no creation]") for v in found)
    with pytest.raises(EVSViolation) as info:
        check_evs(histories, sends)
    text = str(info.value)
    assert text.startswith("EVS violated: 2 violation(s) found")
    assert repr(b"g" * 40) + "...(100 bytes)" in text
    assert ">>      1  deliver from node 1" in text  # the excerpt marks the faulty event


def test_report_shows_at_most_twenty_violations():
    histories, sends = three_nodes_node3_crashes()
    for i in range(25):
        histories[1].append(Delivery(1, f"ghost{i}".encode(), False))
    with pytest.raises(EVSViolation) as info:
        check_evs(histories, sends)
    text = str(info.value)
    assert "25 violation(s) found; the first 20 follow" in text
    assert text.count("[no creation]") == 20


def test_unknown_events_are_rejected():
    with pytest.raises(TypeError):
        check_evs({1: [RING, "not an event"]}, [])


# --------------------------------------------------------------- scale
# (how fast the checker is lives in benchmarks/, never as a wall-clock assertion)


def test_large_clean_run_passes_and_one_swap_is_caught():
    nodes = tuple(range(1, 9))
    ring = reg(1, 4, *nodes)
    sends = [sent(nodes[i % 8], b"%d" % i, safe=i % 3 == 0) for i in range(12_500)]
    order = [ring, *map(dlv, sends)]
    histories = {n: list(order) for n in nodes}  # 100k deliveries
    check_evs(histories, sends, settled=True)
    swapped = histories[8]
    swapped[5000], swapped[5001] = swapped[5001], swapped[5000]
    with pytest.raises(EVSViolation, match="total order"):
        check_evs(histories, sends, settled=True)
