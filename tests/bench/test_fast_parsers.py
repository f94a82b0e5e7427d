"""The sampler's hot-path parsers (bytes in, no decoding) agree with the reference parsers they
shortcut: same figures, or the same ParseError. Kept beside the benchmark that motivated them."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter import cgroupfs
from exporter.cgroupfs import parse_flat_keyed, parse_procs, parse_procs_bytes
from exporter.kernelfiles import ParseError
from exporter.procfs import NO_USER_MEMORY, parse_status, parse_status_bytes

# A whole /proc/PID/status of `sleep` on the development VM (kernel 6.18.44), for the layout.
STATUS = """Name:\tsleep
Umask:\t0022
State:\tS (sleeping)
Tgid:\t4242
Ngid:\t0
Pid:\t4242
PPid:\t4241
TracerPid:\t0
Uid:\t0\t0\t0\t0
Gid:\t0\t0\t0\t0
FDSize:\t64
Groups:\t0
NStgid:\t4242
NSpid:\t4242
NSpgid:\t4241
NSsid:\t4241
Kthread:\t0
VmPeak:\t    5512 kB
VmSize:\t    5512 kB
VmLck:\t       0 kB
VmPin:\t       0 kB
VmHWM:\t    1024 kB
VmRSS:\t    1024 kB
RssAnon:\t{anon} kB
RssFile:\t{file} kB
RssShmem:\t{shmem} kB
VmData:\t     360 kB
VmStk:\t     132 kB
VmExe:\t      16 kB
VmLib:\t    1656 kB
VmPTE:\t      48 kB
VmSwap:\t{swap} kB
HugetlbPages:\t       0 kB
CoreDumping:\t0
THP_enabled:\t1
Threads:\t1
SigQ:\t0/95000
Cpus_allowed_list:\t0-1
voluntary_ctxt_switches:\t1
nonvoluntary_ctxt_switches:\t0
"""

KTHREAD = "Name:\tkthreadd\nUmask:\t0000\nState:\tS (sleeping)\nKthread:\t1\nThreads:\t1\n"


def reference(text: str):
    """parse_status on what the old reader gave it: the file's bytes decoded as ASCII."""
    text = text.encode("utf-8", errors="surrogateescape").decode("ascii", errors="replace")
    try:
        m = parse_status(text)
        return (m.rss_anon, m.rss_file, m.rss_shmem, m.swap)
    except ParseError as e:
        return ("error", str(e))


def fast(text: str):
    try:
        return parse_status_bytes(text.encode("utf-8", errors="surrogateescape"))
    except ParseError as e:
        return ("error", str(e))


numbers = st.integers(0, 2**40).map(lambda n: f"{n:>8}")


@settings(max_examples=300, deadline=None)
@given(numbers, numbers, numbers, numbers)
def test_kernel_layout_gives_the_same_figures(anon, file, shmem, swap):
    text = STATUS.format(anon=anon, file=file, shmem=shmem, swap=swap)
    assert fast(text) == reference(text) == tuple(int(v) * 1024 for v in (anon, file, shmem, swap))


# Odd values and spacing: the fast path must either agree or hand over to the reference.
odd_values = st.one_of(numbers, st.sampled_from(["", " ", "12 MB", "-1", "1_000", "\u0663", "1\r", "  7\x0b", "9" * 30]))


@settings(max_examples=500, deadline=None)
@given(odd_values, odd_values, odd_values, odd_values, st.integers(0, len(STATUS)))
def test_odd_and_truncated_files_agree(anon, file, shmem, swap, cut):
    text = STATUS.replace("{anon}", anon).replace("{file}", file).replace("{shmem}", shmem).replace("{swap}", swap)
    text = text[:cut] if cut % 3 == 0 else text
    assert fast(text) == reference(text)


def test_kernel_thread_and_garbage_agree():
    no_memory = (NO_USER_MEMORY.rss_anon, NO_USER_MEMORY.rss_file, NO_USER_MEMORY.rss_shmem, NO_USER_MEMORY.swap)
    assert fast(KTHREAD) == reference(KTHREAD) == no_memory
    for text in ("", "\x00\xff garbage", "RssAnon:\t1 kB\n"):
        assert fast(text) == reference(text)


def test_a_process_name_cannot_stand_in_for_its_rss_lines():
    # comm may hold "RssAnon: 1 kB" (spaces are not escaped in the Name: line); only a line
    # that starts with the key counts, in both parsers.
    text = STATUS.format(anon="  5000", file="  100", shmem="   0", swap="   0").replace(
        "Name:\tsleep", "Name:\tRssAnon: 1 kB")
    assert fast(text) == reference(text) == (5000 * 1024, 100 * 1024, 0, 0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 4_194_304).map(str), st.sampled_from(["", "x", "-1", "\u0663", "1_0", "+5"])),
                max_size=20), st.sampled_from(["\n", " ", "\t", "\x1c", "\r\n"]))
def test_procs_bytes_agrees_with_parse_procs(tokens, separator):
    text = separator.join(tokens) + "\n"
    try:
        expected = parse_procs(text)
    except ParseError:
        with pytest.raises(ParseError):
            parse_procs_bytes(text.encode())
        return
    assert parse_procs_bytes(text.encode()) == expected


def _flat_keyed_by_lines(text: str, skipped: list[str] | None) -> dict[str, int]:
    """parse_flat_keyed with its fast path out of the way: the reference the fast path shortcuts."""
    saved = cgroupfs._WELL_FORMED_FLAT_KEYED
    cgroupfs._WELL_FORMED_FLAT_KEYED = re.compile("(?!)")  # matches nothing
    try:
        return cgroupfs.parse_flat_keyed(text, skipped)
    finally:
        cgroupfs._WELL_FORMED_FLAT_KEYED = saved


FLAT_KEYED_LINE = st.one_of(
    st.tuples(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), st.integers(0, 2**64)).map(lambda kv: f"{kv[0]} {kv[1]}"),
    st.text(alphabet=" \t\x0c\r_a٣9-", max_size=8),  # odd separators, a non-ASCII digit, blanks
)


@settings(max_examples=400, deadline=None)
@given(st.lists(FLAT_KEYED_LINE, max_size=8), st.booleans())
def test_flat_keyed_fast_path_agrees_with_the_line_loop(lines, trailing_newline):
    text = "\n".join(lines) + ("\n" if trailing_newline and lines else "")
    fast_skipped: list[str] = []
    slow_skipped: list[str] = []
    assert parse_flat_keyed(text, fast_skipped) == _flat_keyed_by_lines(text, slow_skipped)
    assert fast_skipped == slow_skipped
    try:
        strict = parse_flat_keyed(text)
    except ParseError as e:
        with pytest.raises(ParseError, match=re.escape(str(e))):
            _flat_keyed_by_lines(text, None)
    else:
        assert strict == _flat_keyed_by_lines(text, None)




WANTED_KEYS = {"b": "B", "a": "A", "total_x": "x", "d": "D"}


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(FLAT_KEYED_LINE | st.sampled_from(["a 1", "b 2", "total_x 3", "d 4", "a 5"]), max_size=8),
                min_size=1, max_size=4))
def test_selected_keys_agree_with_parse_flat_keyed_whatever_layout_was_learned(texts):
    # Each text is parsed after the layout of the one before it was learned (or not): the
    # values, their order and the skipped lines are those of parse_flat_keyed every time.
    keys = cgroupfs.SelectedKeys(WANTED_KEYS)
    for lines in texts:
        text = "\n".join(lines) + ("\n" if lines else "")
        skipped: list[str] = []
        expected_skipped: list[str] = []
        everything = parse_flat_keyed(text, expected_skipped)
        expected = {name: everything[key] for key, name in WANTED_KEYS.items() if key in everything}
        got = keys.parse(text, skipped)
        assert got == expected and list(got) == list(expected)
        assert skipped == expected_skipped


def test_selected_keys_learn_the_kernels_layout_and_check_every_line():
    keys = cgroupfs.SelectedKeys({"total_rss": "anon", "total_cache": "file"})
    text = "cache 1\nrss 2\ntotal_cache 30\ntotal_rss 40\n"
    assert keys.parse(text) == {"anon": 40, "file": 30}
    assert keys._layout is not None  # learned: the next text of this layout takes one fullmatch
    assert list(keys.parse(text.replace("40", "41"))) == ["anon", "file"]
    with pytest.raises(ParseError):  # a bad value in a line nobody wants still fails the file
        keys.parse(text.replace("rss 2", "rss x"))
    assert keys.parse(text.replace("rss 2", "rss x"), []) == {"anon": 40, "file": 30}


@pytest.mark.parametrize("text", [
    "some avg10=0.00 avg60=0.00 avg300=0.00 total=12\nfull avg10=1.50 avg60=0.00 avg300=0.00 total=7\n",
    "some avg10=0.00 avg60=0.00 avg300=0.00 total=12\n",
    "some avg10=0.00 avg60=0.00 avg300=0.00 total=12\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=x\n",
    "full avg10=0.00 avg60=0.00 avg300=0.00 total=7\n",
])
def test_pressure_fast_path_agrees_with_the_line_loop(text):
    saved = cgroupfs._PRESSURE_LINES
    cgroupfs._PRESSURE_LINES = re.compile("(?!)")
    try:
        reference_result = cgroupfs.parse_pressure(text)
    except ParseError:
        reference_result = ParseError
    finally:
        cgroupfs._PRESSURE_LINES = saved
    try:
        fast_result = cgroupfs.parse_pressure(text)
    except ParseError:
        fast_result = ParseError
    assert fast_result == reference_result
