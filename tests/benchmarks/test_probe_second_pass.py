"""The second-pass probe's bookkeeping (the passes themselves need a GPU): a pass is charged what it added to the
allocator's counters, and the reserved bytes by their change."""

from __future__ import annotations

from benchmarks.probe_second_pass import allocator_counters, counter_deltas


def test_a_pass_is_charged_what_it_added_to_the_allocator_counters():
    before = allocator_counters({"num_alloc_retries": 2, "num_device_alloc": 10, "reserved_bytes.all.current": 4096})
    after = allocator_counters(
        {"num_alloc_retries": 5, "num_device_alloc": 10, "num_device_free": 1, "reserved_bytes.all.current": 1024}
    )
    delta = counter_deltas(before, after)
    assert delta["num_alloc_retries"] == 3 and delta["num_device_alloc"] == 0 and delta["num_device_free"] == 1
    assert delta["reserved_bytes"] == -3072 and delta["num_sync_all_streams"] == 0
