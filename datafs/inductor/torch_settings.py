"""What torch does differently between load and sync, so that a worker that
loads a shared cache skips everything torch lets it skip.

- **Dynamo's caching precompile** (`torch._dynamo.config.caching_precompile`):
  torch saves what Dynamo built for a compiled function (transformed bytecode,
  guards, compiled backends) as one entry under `TORCHINDUCTOR_CACHE_DIR/dynamo/`,
  and a later `torch.compile()` of the same function installs it: the first
  call checks the guards and runs, with no tracing, no AOTAutograd and no
  FX-graph lookups. If the guards fail (other shapes, other dtypes), Dynamo
  traces as usual and the FX-graph cache still serves the kernels. torch writes
  the entries only when asked, so `save_entries()` runs just before publishing;
  they then travel in the archive like any other cache file.
- **No precompiled C++ header** (`torch._inductor.config.cpp_cache_precompile_headers`):
  on CPU, loading a cached kernel still builds torch's precompiled header
  (about 150 MB, 6 s on 2 cores) before finding the kernel's `.so` ready,
  because the header lives in `$TMPDIR`, not in the cache, and a new worker
  has an empty `$TMPDIR`. The setting is part of the FX-graph cache key, so
  it is the same for the worker that compiles and the ones that load.
  An explicit TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS is left alone.

Invariants:
- datafs never imports torch for this: the settings apply only if the app has
  already imported torch when the cache is loaded (an app about to compile has).
- They hold only between load and sync, then the app's own values come back:
  compiles outside `synchronized_inductor_cache` behave as the app set them.
- Any failure here is logged and the worker carries on as without the setting.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

PRECOMPILE_ENV = "DATAFS_INDUCTOR_PRECOMPILE"
PCH_ENV = "TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS"
#: torch warns once per dropped guard while saving a precompile entry (a dozen lines per model).
_DROPPED_GUARD_TEXT = "is dropped with caching_precompile=True"


def precompile_wanted() -> bool:
    """On unless DATAFS_INDUCTOR_PRECOMPILE is 0/false/no/off."""
    return os.environ.get(PRECOMPILE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


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
