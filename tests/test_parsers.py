"""Pure parsers: text in, values out; no filesystem. Bad input raises ParseError, never
anything else (the property tests at the bottom hold every parser to that)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.cgroupfs import (
    Pressure,
    minimal_roots,
    parse_flat_keyed,
    parse_pressure,
    parse_procs,
    parse_limit,
    parse_single_value,
    parse_v1_limit,
)
from exporter.kernelfiles import ParseError
from exporter.memory import memory_from_v1, memory_from_v2
from exporter.procfs import NO_USER_MEMORY, parse_status
from exporter.pss import parse_smaps_rollup, parse_statm_resident
from exporter.systemd import parse_list_units

# /proc/PID/status of a `cat` on the development host (kernel 6.18), cut to its memory part
# plus the "Threads:" line that marks a complete file.
STATUS = """Name:\tcat
Umask:\t0022
State:\tR (running)
VmPeak:\t    3060 kB
VmRSS:\t    1708 kB
RssAnon:\t     112 kB
RssFile:\t    1596 kB
RssShmem:\t       0 kB
VmSwap:\t      16 kB
Threads:\t1
"""

# A kernel thread's status has no Vm*/Rss* lines (kthreadd on the same host).
KTHREAD_STATUS = "Name:\tkthreadd\nUmask:\t0000\nState:\tS (sleeping)\nKthread:\t1\nThreads:\t1\n"


def test_status_fields_in_bytes():
    m = parse_status(STATUS)
    assert (m.rss_anon, m.rss_file, m.rss_shmem, m.swap) == (112 * 1024, 1596 * 1024, 0, 16 * 1024)


def test_kernel_thread_holds_no_user_memory():
    assert parse_status(KTHREAD_STATUS) == NO_USER_MEMORY


@pytest.mark.parametrize(
    "text",
    [
        STATUS[: STATUS.index("RssFile")],  # truncated mid-file
        STATUS.replace("112 kB", "lots kB"),
        STATUS.replace("112 kB", "-112 kB"),
        STATUS.replace("112 kB", "112 MB"),
        "",
        "\x00\xff garbage",
    ],
)
def test_bad_status_is_a_parse_error(text):
    with pytest.raises(ParseError):
        parse_status(text)


def test_single_values():
    assert parse_single_value("167518208\n") == 167518208
    assert parse_limit("max\n") is None and parse_limit("4096\n") == 4096
    for bad in ("", "-1", "12abc", "1.5", "max", "max max"):
        with pytest.raises(ParseError):
            parse_single_value(bad)


def test_v1_limit_unlimited_is_absent():
    # What an unlimited v1 cgroup shows on x86_64 (LONG_MAX rounded to 4 KiB pages).
    assert parse_v1_limit("9223372036854771712\n") is None
    assert parse_v1_limit("67108864\n") == 64 << 20


def test_flat_keyed():
    assert parse_flat_keyed("anon 10\nfile 20\n") == {"anon": 10, "file": 20}
    for bad in ("anon\n", "anon ten\n", "anon -1\n", " 10\n"):
        with pytest.raises(ParseError):
            parse_flat_keyed(bad)


def test_pressure_totals():
    # Format from Documentation/accounting/psi.rst ("Pressure interface").
    text = "some avg10=0.00 avg60=0.00 avg300=0.00 total=1234\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=567\n"
    p = parse_pressure(text)
    assert (p.some_total_us, p.full_total_us) == (1234, 567)
    with pytest.raises(ParseError):
        parse_pressure("full avg10=0.00 total=5\n")
    with pytest.raises(ParseError):
        parse_pressure("some total=x\n")
    with pytest.raises(ParseError, match="no total= in the 'full' line"):  # cut short: not "no full"
        parse_pressure("some avg10=0.00 avg60=0.00 avg300=0.00 total=5\nfull avg10=0.00 avg60=0.00 avg300=0.00\n")
    assert parse_pressure("some avg10=0.00 avg60=0.00 avg300=0.00 total=5\n") == Pressure(5, None)


def test_procs():
    assert parse_procs("1\n20\n300\n") == [1, 20, 300]
    assert parse_procs("") == []
    with pytest.raises(ParseError):
        parse_procs("12\nabc\n")


def test_v1_maps_total_keys_to_v2_names_and_reads_events():
    files = {
        "memory.usage_in_bytes": "1000\n",
        "memory.stat": "cache 1\nrss 2\ntotal_cache 300\ntotal_rss 400\ntotal_shmem 50\ntotal_mapped_file 60\n"
        "total_inactive_file 100\ntotal_swap 7\n",
        "memory.limit_in_bytes": "9223372036854771712\n",
        "memory.failcnt": "3\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        "memory.kmem.usage_in_bytes": "90\n",
    }
    problems = []
    m = memory_from_v1(files, problems)
    assert problems == []
    assert m.usage == 1000 and m.page_cache == 300 and m.swap == 7
    assert dict(m.stat) == {"file": 300, "anon": 400, "shmem": 50, "file_mapped": 60, "inactive_file": 100, "kernel": 90}
    assert m.working_set == 900
    assert dict(m.limits) == {}  # unlimited: absent
    assert dict(m.events) == {"max": 3, "oom_kill": 2}
    assert m.peak is None  # file not given: absent, not 0


def test_v1_without_swap_accounting_has_no_swap():
    m = memory_from_v1({"memory.usage_in_bytes": "1\n", "memory.stat": "total_cache 0\n"}, [])
    assert m.swap is None


def test_v2_limits_max_is_absent_and_zero_protection_is_unset():
    files = {
        "memory.current": "5000\n",
        "memory.stat": "anon 1000\nfile 3000\ninactive_file 6000\nkernel 200\npgfault 9\n",
        "memory.max": "max\n",
        "memory.high": "4096\n",
        "memory.low": "0\n",
        "memory.min": "8192\n",
        "memory.swap.max": "max\n",
        "memory.events": "low 0\nhigh 4\nmax 1\noom 1\noom_kill 1\noom_group_kill 0\n",
    }
    m = memory_from_v2(files, [])
    assert dict(m.limits) == {"high": 4096, "min": 8192}
    assert m.working_set == 0  # floored: inactive_file can exceed usage in a racy read
    assert "pgfault" not in m.stat
    assert m.events["oom_kill"] == 1 and m.events["high"] == 4
    assert m.swap is None  # no memory.swap.current: the kernel cannot tell


def test_one_bad_file_leaves_the_others():
    problems = []
    m = memory_from_v2({"memory.current": "garbage\n", "memory.stat": "anon 5\nfile 7\n"}, problems)
    assert m.usage is None and m.stat["anon"] == 5
    assert [name for name, _ in problems] == ["memory.current"]


@pytest.mark.parametrize("text", ["", "anon 5\n", "file 7\nshmem 0\n"])
def test_a_memory_stat_without_anon_or_file_is_an_error_not_an_empty_cgroup(text):
    """Every kernel's memory.stat has anon and file (v1: total_rss, total_cache); an empty or
    cut-short file is counted, its other keys kept, and nothing becomes 0."""
    problems = []
    m = memory_from_v2({"memory.current": "100\n", "memory.stat": text}, problems)
    assert problems == [("memory.stat", "lacks anon or file")]
    assert m.usage == 100 and m.stat.get("anon") == (5 if "anon" in text else None)
    v1_problems = []
    v1 = memory_from_v1({"memory.usage_in_bytes": "100\n", "memory.stat": "cache 5\nrss 7\n"}, v1_problems)
    assert v1_problems == [("memory.stat", "lacks total_rss or total_cache")] and dict(v1.stat) == {}
    # A file that could not be read is absent, not an error of its own here (the reader counts it).
    unread: list = []
    assert not memory_from_v2({"memory.current": "100\n"}, unread).stat and unread == []



def test_v2_before_5_18_gets_its_kernel_total_summed_from_the_parts():
    """5.18 added memory.stat's kernel total; before it (Debian 11's 5.10, Ubuntu 22.04's 5.15)
    the same item is the sum of the parts the kernel prints, sock left out as 5.18's total
    leaves it, and the record says it was summed. A printed total is never replaced."""
    parts = "kernel_stack 16384\npercpu 480\nsock 4096\nslab_reclaimable 1000\nslab_unreclaimable 2000\nslab 3000\n"
    m = memory_from_v2({"memory.stat": "anon 5\nfile 7\n" + parts}, [])
    assert m.stat["kernel"] == 16384 + 480 + 3000 and m.kernel_summed
    printed = memory_from_v2({"memory.stat": "anon 5\nfile 7\nkernel 90000\n" + parts}, [])
    assert printed.stat["kernel"] == 90000 and not printed.kernel_summed
    # Before 5.9 there is no slab key: its two halves stand in; pagetables (5.11+) is added when there.
    before_5_9 = memory_from_v2({"memory.stat": "anon 5\nfile 7\npagetables 8192\n" + parts.replace("slab 3000\n", "")}, [])
    assert before_5_9.stat["kernel"] == 16384 + 8192 + 480 + 1000 + 2000
    # No part at all: no kernel figure, never 0.
    bare = memory_from_v2({"memory.stat": "anon 5\nfile 7\nsock 4096\n"}, [])
    assert "kernel" not in bare.stat and not bare.kernel_summed
    # v1 takes its kernel figure from memory.kmem.usage_in_bytes and never sums.
    v1 = memory_from_v1({"memory.stat": "total_rss 5\ntotal_cache 7\n", "memory.kmem.usage_in_bytes": "4096\n"}, [])
    assert v1.stat["kernel"] == 4096 and not v1.kernel_summed

# Property tests: whatever bytes a file holds, a parser returns a value or raises ParseError.
PARSERS = [parse_smaps_rollup, parse_single_value, parse_limit, parse_v1_limit, parse_flat_keyed, parse_pressure, parse_procs, parse_status]
texts = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300).map(lambda b: b.decode("ascii", errors="replace")),
    st.lists(st.sampled_from(["anon", "max", "-1", "total=", "some", "kB", "RssAnon:", "\t", " ", "\n", "9" * 30]))
    .map("".join),
)


@settings(max_examples=300, deadline=None)
@given(texts, st.sampled_from(PARSERS))
def test_parsers_raise_only_parse_error(text, parser):
    try:
        parser(text)
    except ParseError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z_]{1,20}", fullmatch=True), st.integers(0, 2**64 - 1), max_size=30))
def test_flat_keyed_round_trip(values):
    text = "".join(f"{k} {v}\n" for k, v in values.items())
    assert parse_flat_keyed(text) == values


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(["memory.current", "memory.stat", "memory.max", "memory.events",
                                               "memory.swap.current", "memory.peak", "memory.high"])), texts))
def test_v2_builder_never_raises(files):
    problems = []
    m = memory_from_v2(files, problems)
    assert all(v >= 0 for v in m.stat.values())
    if m.working_set is not None:
        assert m.working_set >= 0


def test_one_malformed_stat_line_keeps_the_rest():
    problems = []
    m = memory_from_v2({"memory.stat": "anon 5\nfile -3\nshmem 2\n"}, problems)
    assert dict(m.stat) == {"anon": 5, "shmem": 2}
    assert problems == [("memory.stat", "skipped malformed line 'file -3'")]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_statm_parser_raises_only_parse_error(data):
    try:
        assert parse_statm_resident(data) >= 0
    except ParseError:
        pass


def test_list_units_keeps_every_load_state_and_the_exact_names():
    # The shape pystemd returns for ListUnits (a(ssssssouso)), strings as bytes.
    def entry(name: bytes, load: bytes, active: bytes = b"active", sub: bytes = b"running"):
        return (name, b"", load, active, sub, b"", b"/org/freedesktop/systemd1/unit/" + name.split(b".")[0], 0, b"", b"/")

    body = [
        entry(b"foo\\x2dbar.service", b"loaded"),
        # Still running with their cgroup and memory, as systemctl list-units shows them: the
        # file removed and daemon-reload, masked while running, a bad edit. They were dropped.
        entry(b"removed.service", b"not-found"),
        entry(b"masked.service", b"masked"),
        entry(b"bad.service", b"bad-setting"),
        entry(b"broken.service", b"error"),
        # Listed because something refers to it; refresh() drops it for being inactive.
        entry(b"gone.service", b"not-found", b"inactive", b"dead"),
    ]
    units = parse_list_units(body)
    assert [(u.name, u.active_state, u.sub_state) for u in units] == [
        ("foo\\x2dbar.service", "active", "running"), ("removed.service", "active", "running"),
        ("masked.service", "active", "running"), ("bad.service", "active", "running"),
        ("broken.service", "active", "running"), ("gone.service", "inactive", "dead"),
    ]
    assert units[0].object_path == b"/org/freedesktop/systemd1/unit/foo\\x2dbar"


def test_minimal_roots_cover_every_subtree_once():
    paths = ["/system.slice/a.service", "/system.slice", "/user.slice/user-0.slice", "/system.slice-x/b.service",
             "/system.slice", "/user.slice/user-0.slice/session-1.scope"]
    # "/system.slice-x" shares a prefix with "/system.slice" but is not inside it.
    assert minimal_roots(paths) == ["/system.slice", "/system.slice-x/b.service", "/user.slice/user-0.slice"]
    assert minimal_roots(["/a.slice/b.service", "/", "/c.slice"]) == ["/"]  # the root holds everything
    assert minimal_roots([]) == []
