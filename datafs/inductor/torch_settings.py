"""What torch does differently between load and sync, so that a worker that
loads a shared cache skips everything torch lets it skip. Each choice was
measured on the CPU build of torch 2.13 (a small CNN, 2 cores):

- **No precompiled C++ header** (`torch._inductor.config.cpp_cache_precompile_headers`):
  loading a cached CPU kernel still builds torch's precompiled header (about
  150 MB, 6 s) before it finds the kernel's `.so` ready, because the header
  lives in `$TMPDIR`, not in the cache, and a new worker's `$TMPDIR` is empty.
  The setting is part of the FX-graph cache key, so it is the same for the
  worker that compiles and the ones that load. An explicit
  TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS is left alone.
- **The CPU ISA probe beside the compiler's imports**: before loading a C++
  kernel torch checks which vector ISAs work by loading a test library in a
  new Python process per ISA (about 1 s in all), and its first compile imports
  the compiler (about as long). `prepare_compiler()` does both at once right
  after the archive is unpacked (the probe keeps its test libraries in the
  cache), and waits for both before the app's own work starts.
- **Dynamo's caching precompile** (`torch._dynamo.config.caching_precompile`;
  DATAFS_INDUCTOR_PRECOMPILE=0 turns it off): torch saves what Dynamo built
  (bytecode, guards, compiled backends) under `TORCHINDUCTOR_CACHE_DIR/dynamo/`
  and a later `torch.compile()` of the same function installs it, so a loading
  worker neither traces nor runs AOTAutograd nor looks up FX graphs. If the
  guards fail (a new shape) Dynamo traces as usual and the FX-graph cache
  serves what it can. Two defects of torch 2.13 shape how it is used: that
  retrace would fail on a global name every process numbers from 0 (the
  loaded entry installed the same name), so datafs numbers this process's
  names from a random start; and torch cannot save guards on a class defined
  inside a function or another class (TypeError "defined in local scope"),
  which `synchronized_inductor_cache` explains in one line (move the class to
  module level, or turn precompile off). `save_entries()` writes the entries
  just before publishing (torch writes them only when asked).

Invariants:
- datafs never imports torch for this: the settings apply only if the app has
  already imported torch when the cache is loaded (an app about to compile has).
- They hold only between load and sync, then the app's own values come back:
  compiles outside `synchronized_inductor_cache` behave as the app set them.
- Any failure here is logged and the worker carries on as without the setting.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import secrets
import sys
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

PRECOMPILE_ENV = "DATAFS_INDUCTOR_PRECOMPILE"
PCH_ENV = "TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS"
#: torch warns once per dropped guard while saving a precompile entry (a dozen lines per model).
_DROPPED_GUARD_TEXT = "is dropped with caching_precompile=True"


def precompile_wanted() -> bool:
    """On unless DATAFS_INDUCTOR_PRECOMPILE is 0/false/no/off."""
    return os.environ.get(PRECOMPILE_ENV, "").strip().lower() not in ("0", "false", "no", "off")


_unique_names_moved = False


def _unique_names_from_a_random_start() -> None:
    """Dynamo names the globals it installs `<prefix>_<n>` from a per-process
    counter starting at 0, and a loaded precompiled entry installs the names of
    the process that saved it: the first retrace here would then install the
    same name again and fail. Numbering from a random start keeps them apart."""
    global _unique_names_moved
    if _unique_names_moved:
        return
    try:
        import torch._dynamo.bytecode_transformation as transformation
    except Exception:
        log.debug("cannot renumber Dynamo's global names", exc_info=True)
        return
    counter = getattr(transformation, "_unique_id_counter", None)
    if isinstance(counter, itertools.count):
        transformation._unique_id_counter = itertools.count(next(counter) + 1_000_000 + secrets.randbelow(1 << 40))
        _unique_names_moved = True


#: Modules torch.compile imports on its first call; importing them is the same work, done earlier.
_COMPILER_MODULES = ("torch._dynamo.convert_frame", "torch._inductor.compile_fx")
PROBE_TIMEOUT_SECONDS = 300.0
_prepared = False
#: How long the last prepare_compiler() took, and each of its two halves (they overlap).
prepare_timings: dict[str, float] = {}


def prepare_compiler(cpu: bool) -> None:
    """Do two things the first compile would do one after the other, side by
    side: find the usable CPU vector ISAs (their probes are child processes, so
    the probing thread mostly waits) while this thread imports the compiler.

    The probe is joined before returning: torch's answer is then cached for
    the process and nothing probes concurrently with the app's compile (a
    probe racing with one torch starts itself can pick another ISA, and so
    other kernel keys: every kernel rebuilt)."""
    global _prepared
    if _prepared or "torch" not in sys.modules:
        return
    _prepared = True
    started = time.perf_counter()
    probe: threading.Thread | None = None
    if cpu:
        try:  # the probe's own imports, here, so the two threads never import at once
            import torch._inductor.codecache  # noqa: F401
            import torch._inductor.cpp_builder  # noqa: F401
            from torch._inductor.cpu_vec_isa import valid_vec_isa_list
        except Exception:
            log.debug("no CPU ISA probe in this torch", exc_info=True)
        else:
            probe = threading.Thread(target=_probe, args=(valid_vec_isa_list,), name="datafs-cpu-isa-probe", daemon=True)
            probe.start()
    for module in _COMPILER_MODULES:
        try:
            importlib.import_module(module)
        except Exception:
            log.debug("could not import %s ahead of the compile", module, exc_info=True)
    prepare_timings["compiler_imports_seconds"] = round(time.perf_counter() - started, 3)
    if probe is not None:
        probe.join(PROBE_TIMEOUT_SECONDS)
    prepare_timings["prepare_seconds"] = round(time.perf_counter() - started, 3)


def _probe(valid_vec_isa_list: Any) -> None:
    started = time.perf_counter()
    try:
        valid_vec_isa_list()
    except Exception:
        log.debug("the CPU ISA probe failed; torch will probe again when it needs to", exc_info=True)
    prepare_timings["cpu_isa_probe_seconds"] = round(time.perf_counter() - started, 3)


#: torch 2.13's words when precompile meets a class that pickle cannot name.
_UNSAVABLE_CLASS_TEXT = "cannot be saved into torch.compile() package"


def unsavable_class(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from) is torch refusing to save a nested or local class."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 10:
        if _UNSAVABLE_CLASS_TEXT in str(current):
            return True
        current, seen = current.__cause__ or current.__context__, seen + 1
    return False


class _DroppedGuardFilter(logging.Filter):
    """Keeps torch's per-guard 'dropped with caching_precompile' warnings out of the app's log."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if _DROPPED_GUARD_TEXT in str(record.msg):
            self.dropped += 1
            return False
        return True


class CompileSettings:
    """Applies the settings for one load..sync span and puts the app's back after."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []  # (config module, name, the app's value)
        self._filter: _DroppedGuardFilter | None = None

    @property
    def precompile(self) -> bool:
        return any(name == "caching_precompile" for _, name, _ in self._saved)

    def apply(self) -> None:
        if self._saved or "torch" not in sys.modules:
            return
        try:
            import torch._dynamo.config as dynamo_config
            import torch._inductor.config as inductor_config
        except Exception:
            log.debug("torch's compiler configuration is not importable", exc_info=True)
            return
        if precompile_wanted() and hasattr(dynamo_config, "caching_precompile"):
            _unique_names_from_a_random_start()
            self._set(dynamo_config, "caching_precompile", True)
            self._filter = _DroppedGuardFilter()
            logging.getLogger("torch._dynamo.guards").addFilter(self._filter)
        if PCH_ENV not in os.environ and hasattr(inductor_config, "cpp_cache_precompile_headers"):
            self._set(inductor_config, "cpp_cache_precompile_headers", False)

    def _set(self, config: Any, name: str, value: Any) -> None:
        self._saved.append((config, name, getattr(config, name)))
        setattr(config, name, value)

    def save_entries(self) -> None:
        """Write Dynamo's entries for what this process compiled into the local cache."""
        if not self.precompile:
            return
        try:
            from torch._dynamo.precompile_context import PrecompileContext

            PrecompileContext.save_to_dynamo_cache()
        except Exception:
            log.warning("could not save Dynamo's precompiled entries; other workers will trace again", exc_info=True)

    def restore(self) -> None:
        for config, name, value in reversed(self._saved):
            setattr(config, name, value)
        self._saved.clear()
        if self._filter is not None:
            logging.getLogger("torch._dynamo.guards").removeFilter(self._filter)
            if self._filter.dropped:
                log.debug("torch dropped %d guards that cannot be saved with a precompiled entry", self._filter.dropped)
            self._filter = None
