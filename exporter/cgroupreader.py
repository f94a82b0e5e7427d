"""The thin reader of a unit's cgroup memory files: each read once per cycle, handed to the pure
builders of exporter/memory.py, every failure through the error boundary."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from . import memory as memfiles
from .cgroupfs import Layout, MemoryVersion, cgroup_path
from .errorlog import CycleErrors
from .kernelfiles import VANISHED, read_many


class CgroupReader:
    """One per cycle: its failed reads are that cycle's (``errors``)."""

    def __init__(self, layout: Layout, errors: CycleErrors,
                 read_each: Callable[[list[str]], list[bytes | OSError]] = read_many, pressure: bool = True):
        self.layout = layout
        self.errors = errors
        # pressure=False: PSI is off in this kernel (an earlier cycle's reads were refused), so
        # the pressure files are not read at all. It cannot be turned on without a reboot.
        self._pressure = pressure
        self.pressure_refused = False  # a read was refused this cycle: PSI is off
        # read_many, or a KeptFiles' (exporter/keptfiles.py): descriptors kept across cycles.
        # One call per unit reads its memory files and its memory.pressure.
        self._read_each = read_each
        if layout.memory_version is MemoryVersion.V2:
            self._files, self._build = memfiles.V2_FILES, memfiles.memory_from_v2
        else:
            self._files, self._build = memfiles.V1_FILES, memfiles.memory_from_v1

    def memory(self, cgroup: str) -> memfiles.CgroupMemory | None:
        if self.layout.memory_root is None:
            return None
        directory = cgroup_path(self.layout.memory_root, cgroup)
        paths = [f"{directory}/{name}" for name in self._files]
        pressure_path = None
        if self.layout.pressure_root is not None and self._pressure:
            pressure_path = f"{cgroup_path(self.layout.pressure_root, cgroup)}/{memfiles.PRESSURE_FILE}"
            paths.append(pressure_path)
        texts: dict[str, str] = {}
        for name, path, data in zip((*self._files, memfiles.PRESSURE_FILE), paths, self._read_each(paths)):
            if type(data) is bytes:
                # A stray non-ASCII byte becomes U+FFFD, which the parsers reject.
                texts[name] = data.decode("ascii", errors="replace")
            elif path == pressure_path and data.errno == errno.EOPNOTSUPP:
                # PSI is compiled in but off (psi=0, or CONFIG_PSI_DEFAULT_DISABLED as openEuler
                # builds it, without psi=1): the files are there and every read refuses. No
                # pressure figures, as on a kernel without PSI; not a failed read.
                self.pressure_refused = True
            elif self.errors.read_failed("cgroup", path, data) == VANISHED and not os.path.isdir(os.path.dirname(path)):
                if path != pressure_path:
                    return None  # the unit's cgroup went away mid-read
            # else: this kernel has no such file (memory.peak before 5.19...): absent.
        pressure_text = texts.pop(memfiles.PRESSURE_FILE, None)
        if not texts:
            # v1: no memory cgroup for units without MemoryAccounting; or the unit just went.
            return None
        problems: memfiles.Problems = []
        pressure_problems: memfiles.Problems = []
        pressure = None
        if pressure_text is not None:
            pressure = memfiles.parse_pressure_file({memfiles.PRESSURE_FILE: pressure_text}, pressure_problems)
        memory = self._build(texts, problems, pressure)
        # One count per bad file, however many of its lines were bad.
        for name, message in dict(reversed(problems)).items():
            self.errors.error("cgroup", "parse", f"{directory}/{name}", message)
        for name, message in pressure_problems:
            self.errors.error("cgroup", "parse", pressure_path, message)
        return memory
