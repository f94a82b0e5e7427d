"""The thin reader of a unit's cgroup memory files: each read once per cycle, handed to the pure
builders of exporter/memory.py, every failure through the error boundary."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from . import memory as memfiles
from .cgroupfs import Layout, MemoryVersion, cgroup_path
from .errorlog import CycleErrors
from .kernelfiles import VANISHED, read_text


def read_files(directory: str, names: Iterable[str], errors: CycleErrors,
               read: Callable[[str], str] = read_text) -> dict[str, str] | None:
    """Texts of the files that exist; None when the directory itself is gone."""
    texts = {}
    for name in names:
        path = f"{directory}/{name}"
        try:
            texts[name] = read(path)
        except OSError as e:
            if errors.read_failed("cgroup", path, e) == VANISHED and not os.path.isdir(directory):
                return None
            # else: this kernel has no such file (memory.peak before 5.19...): absent.
    return texts


class CgroupReader:
    """One per cycle: its failed reads are that cycle's (``errors``)."""

    def __init__(self, layout: Layout, errors: CycleErrors, read: Callable[[str], str] = read_text):
        self.layout = layout
        self.errors = errors
        # read_text, or a KeptFiles' (exporter/keptfiles.py): descriptors kept across cycles.
        self._read = read
        if layout.memory_version is MemoryVersion.V2:
            self._files, self._build = memfiles.V2_FILES, memfiles.memory_from_v2
        else:
            self._files, self._build = memfiles.V1_FILES, memfiles.memory_from_v1

    def memory(self, cgroup: str) -> memfiles.CgroupMemory | None:
        if self.layout.memory_root is None:
            return None
        directory = cgroup_path(self.layout.memory_root, cgroup)
        texts = read_files(directory, self._files, self.errors, self._read)
        if texts is None or not texts:
            # v1: no memory cgroup for units without MemoryAccounting; or the unit just went.
            return None
        problems: memfiles.Problems = []
        memory = self._build(texts, problems)
        if self.layout.pressure_root is not None:
            pressure_texts = read_files(
                cgroup_path(self.layout.pressure_root, cgroup), (memfiles.PRESSURE_FILE,), self.errors, self._read
            )
            memory = memory.with_pressure(memfiles.parse_pressure_file(pressure_texts or {}, problems))
        # One count per bad file, however many of its lines were bad.
        for name, message in dict(reversed(problems)).items():
            self.errors.error("cgroup", "parse", f"{directory}/{name}", message)
        return memory
