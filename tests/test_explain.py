"""`explain` in words: human_bytes, each verdict on breakdowns built by hand, and the report on a
fixture tree (tests/fixtures/hybrid, captured from a live host)."""

from __future__ import annotations

import pytest

from exporter.explain import explain, explain_text, human_bytes, no_memory_cgroup, reconcile, verdict
from exporter.procfs import ProcessTotals
from exporter.snapshot import Breakdown, UnitSample
from exporter.systemd import Unit
from tests.test_sampler import FIXTURES, sample_tree

MiB = 1 << 20


@pytest.mark.parametrize(
    "value, text",
    [
        (None, "n/a"),
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (-2048, "-2.0 KiB"),  # a negative remainder or gap keeps its sign
        (10 * MiB, "10.0 MiB"),
        (3 << 40, "3.0 TiB"),
        (1 << 60, "1024.0 PiB"),  # PiB is the largest unit: no "EiB"
    ],
)
def test_human_bytes(value, text):
    assert human_bytes(value) == text


def breakdown(systemctl, top, anon=0, unmapped_cache=0, shmem=0):
    """Only the fields the verdicts read matter; the rest are left unknown."""
    return Breakdown(systemctl, top, anon, None, unmapped_cache, shmem, None, None, None)


@pytest.mark.parametrize(
    "b, words",
    [
        (breakdown(None, 5 * MiB), "No cgroup figure to compare."),
        (breakdown(1000 * MiB, 100 * MiB, unmapped_cache=600 * MiB), "60 % of systemctl's figure is reclaimable page cache"),
        (breakdown(1000 * MiB, 100 * MiB, unmapped_cache=100 * MiB, shmem=400 * MiB), "400.0 MiB is tmpfs/shared memory (40 %)"),
        (breakdown(1000 * MiB, 950 * MiB), "systemctl and top are close"),
        (breakdown(20 * MiB, 10 * MiB), "systemctl and top are close"),  # 10 MiB apart: under the 16 MiB floor
        (breakdown(500 * MiB, 900 * MiB), "top counts 400.0 MiB more than the cgroup holds"),
        (breakdown(1000 * MiB, 500 * MiB, unmapped_cache=100 * MiB), "systemctl counts 500.0 MiB more than top"),
    ],
    ids=["no-cgroup", "page-cache", "shmem", "close", "close-small", "top-more", "systemctl-more"],
)
def test_verdicts(b, words):
    assert words in verdict(b)


def test_page_cache_wins_over_shmem_when_both_are_large():
    """The order of the checks is part of the answer: 50 % cache is "not a leak" even with
    30 % shmem beside it."""
    text = verdict(breakdown(1000 * MiB, 100 * MiB, unmapped_cache=500 * MiB, shmem=300 * MiB))
    assert "Not a leak" in text and "tmpfs" not in text


def test_a_unit_without_a_memory_cgroup_is_explained_by_top_alone():
    unit = Unit("legacy.service", "service", "active", "running", "/system.slice/legacy.service")
    text = explain_text(reconcile(UnitSample(unit, ProcessTotals(2, 3 * MiB, 1 * MiB, 0, 0), None)))
    assert "No memory cgroup" in text and "4.0 MiB" in text and "Verdict" not in text


def test_no_memory_cgroup_is_worded_for_v1_and_v2_in_explain_and_on_the_page():
    """One sentence for both renderings; a v2 user unit without delegated memory is not "on v1"."""
    import html

    from exporter.page import unit_page

    for uid, cause in ((None, "MemoryAccounting=no"), (1500, "Delegate=memory")):
        unit = Unit("x.service", "service", "active", "", "/user.slice/user-1500.slice/user@1500.service/app.slice/x.service", uid)
        r = reconcile(UnitSample(unit, ProcessTotals(1, 3 * MiB, 1 * MiB, 0, 0), None))
        why = no_memory_cgroup(r)
        assert cause in why and "v2" in why and ("on cgroup v1" not in why)
        assert " ".join(line.strip() for line in explain_text(r).splitlines()[1:] if not line.startswith("  top says")
                        and not line.startswith("  systemctl says")) == why
        assert f"<p>{html.escape(why)}</p>" in unit_page(r)


def test_report_on_a_fixture_tree_names_the_layout_and_the_largest_units():
    snapshot = sample_tree(FIXTURES / "hybrid")
    text = explain(snapshot, top=3)
    assert text.startswith("cgroup hybrid layout, memory controller on v1;")
    ranked = sorted((s for s in snapshot.units if s.unit.type != "slice" and s.memory),
                    key=lambda s: s.memory.usage or 0, reverse=True)
    first, fourth = ranked[0].unit.name, ranked[3].unit.name
    assert f"\n{first}  (" in text and f"\n{fourth}  (" not in text
    assert text.count("Verdict:") == 3
    # Asked by name, a slice is explained too; the root slice says what systemctl shows instead
    # on a host (systemd reads /proc/meminfo for it there, on v1 as on v2).
    root = explain(snapshot, ["-.slice"])
    assert "\n-.slice  (" in root and "systemctl shows MemTotal - MemAvailable instead" in root
    assert "MemTotal" not in explain(snapshot, [first])


def _sample_with_stat(stat_text: str, usage: int, rss_shmem: int) -> UnitSample:
    from exporter.memory import memory_from_v2

    memory = memory_from_v2({"memory.current": f"{usage}\n", "memory.stat": stat_text}, [])
    unit = Unit("postgresql@15-main.service", "service", "active", "running", "/system.slice/postgresql@15-main.service")
    return UnitSample(unit, ProcessTotals(20, 200 * MiB, 100 * MiB, rss_shmem, 0), memory)


def test_mapped_shared_memory_is_not_taken_for_mapped_files():
    """file_mapped counts mapped shmem too. A database: 4 GiB shared_buffers mapped by 20
    backends (RssShmem sums to 80 GiB), 100 MiB of mapped files, 924 MiB of page cache nobody
    maps. Capping file_mapped at file - shmem called all 1 GiB "mapped files" and left no
    reclaimable cache at all."""
    GiB = 1024 * MiB
    stat = f"anon {200 * MiB}\nfile {5 * GiB}\nshmem {4 * GiB}\nfile_mapped {4 * GiB + 100 * MiB}\nkernel {10 * MiB}\n"
    b = Breakdown.of(_sample_with_stat(stat, 5 * GiB + 210 * MiB, 80 * GiB))
    assert (b.mapped_file, b.unmapped_cache, b.shmem) == (100 * MiB, 924 * MiB, 4 * GiB)
    assert b.anon + b.mapped_file + b.unmapped_cache + b.shmem + b.kernel + b.remainder == b.systemctl
    # Processes that map none of it: all of file_mapped is mapped files, as before.
    unmapped_shm = Breakdown.of(_sample_with_stat(stat, 5 * GiB + 210 * MiB, 0))
    assert (unmapped_shm.mapped_file, unmapped_shm.unmapped_cache) == (1 * GiB, 0)


def test_a_page_cache_split_the_kernel_does_not_give_is_absent_not_a_remainder():
    """Without shmem or file_mapped (a malformed memory.stat, counted as such) the file part
    cannot be split: its parts and the remainder are absent, not a remainder that lost the
    whole page cache."""
    no_shmem = Breakdown.of(_sample_with_stat(f"anon {MiB}\nfile {200 * MiB}\nfile_mapped 0\n", 201 * MiB, 0))
    assert (no_shmem.mapped_file, no_shmem.unmapped_cache, no_shmem.shmem, no_shmem.remainder) == (None, None, None, None)
    no_mapped = Breakdown.of(_sample_with_stat(f"anon {MiB}\nfile {200 * MiB}\nshmem 0\n", 201 * MiB, 0))
    assert (no_mapped.mapped_file, no_mapped.unmapped_cache, no_mapped.remainder) == (None, None, None)
    assert no_mapped.anon == MiB and no_mapped.systemctl == 201 * MiB


def test_kernel_memory_of_a_kernel_before_5_18_is_a_part_not_the_remainder():
    """5.15's memory.stat has kernel_stack, pagetables, percpu and slab but no kernel total.
    Without the sum the 30 MiB of slab landed in "unexplained remainder"; now it is the
    kernel part, which says it was summed, and sockets stay in the remainder."""
    stat = (f"anon {100 * MiB}\nfile {50 * MiB}\nshmem 0\nfile_mapped {10 * MiB}\nkernel_stack {MiB}\n"
            f"pagetables {2 * MiB}\npercpu 0\nsock {3 * MiB}\nslab {30 * MiB}\n")
    r = reconcile(_sample_with_stat(stat, 186 * MiB, 0))
    parts = {p.key: p for p in r.parts}
    assert parts["kernel"].bytes == 33 * MiB and "before 5.18" in parts["kernel"].why
    assert parts["remainder"].bytes == 3 * MiB  # the sockets
    assert "summed" in explain_text(r)
    printed = reconcile(_sample_with_stat(stat + f"kernel {35 * MiB}\n", 186 * MiB, 0))
    assert {p.key: p for p in printed.parts}["kernel"].why == "slab, kernel stacks, page tables charged to the unit"


def test_a_negative_v1_remainder_says_why_it_is_below_zero():
    """v1's usage_in_bytes is batched per CPU and can run below memory.stat's itemised parts."""
    from exporter.memory import memory_from_v1

    memory = memory_from_v1({"memory.usage_in_bytes": f"{100 * MiB}\n", "memory.kmem.usage_in_bytes": f"{MiB}\n",
                             "memory.stat": f"total_rss {60 * MiB}\ntotal_cache {41 * MiB}\ntotal_shmem 0\ntotal_mapped_file 0\n"}, [])
    unit = Unit("a.service", "service", "active", "running", "/system.slice/a.service")
    r = reconcile(UnitSample(unit, ProcessTotals(1, 60 * MiB, 0, 0, 0), memory))
    remainder = {p.key: p for p in r.parts}["remainder"]
    assert remainder.bytes == -2 * MiB and remainder.why.startswith("below zero")
    assert "below zero" in explain_text(r) and "-2.0 MiB" in explain_text(r)


@pytest.mark.parametrize("usage, limit, shown", [
    (None, 64 * MiB, "working set n/a"),  # memory.current unreadable this cycle: no share to give
    (4096, 0, "working set 4.0 KiB"),  # MemoryMax=0: a share of nothing
    (32 * MiB, 64 * MiB, "working set 32.0 MiB = 50 % of it"),
])
def test_the_memorymax_line_gives_a_share_only_when_there_is_one(usage, limit, shown):
    from exporter.memory import memory_from_v2

    files = {"memory.stat": f"anon {usage or 0}\nfile 0\nshmem 0\nfile_mapped 0\ninactive_file 0\n",
             "memory.max": f"{limit}\n", **({"memory.current": f"{usage}\n"} if usage is not None else {})}
    unit = Unit("a.service", "service", "active", "running", "/system.slice/a.service")
    line = next(line for line in explain_text(reconcile(UnitSample(unit, ProcessTotals(1, 0, 0, 0, 0),
                                                                   memory_from_v2(files, [])))).splitlines()
                if line.lstrip().startswith("MemoryMax"))
    assert line.endswith(shown), line
