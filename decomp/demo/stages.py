"""The demo's bookkeeping: wall and CPU time per stage, progress by batch or layer, and the
machine's load sampled while it runs."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from decomp.data import DataBundle

logger = logging.getLogger("decomp.demo")

ProgressCallback = Callable[[str, int, int | None], None]
"""``progress(stage, done, total)``: called when a stage starts (done 0), as its work advances
(batches, layers) and when it ends (done == total). ``total`` is None while unknown."""

LOAD_SAMPLE_SECONDS = 10.0
"""How often ``results["load"]`` samples the load average."""


class Stages:
    """Wall and CPU time per stage, in order, and the progress of the running stage."""

    def __init__(self, progress: ProgressCallback | None) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.progress = progress
        self.current: str | None = None
        self.done, self.size = 0, None
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    @contextlib.contextmanager
    def __call__(self, name: str, total: int | None = 1) -> Iterator[None]:
        """Time the block as stage ``name`` of ``total`` steps (batches, layers)."""
        logger.info("demo: %s", name.replace("_", " "))
        self.current, self.done, self.size = name, 0, total
        self._tell()
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - wall, 3)
            self.cpu_seconds[name] = round(time.process_time() - cpu, 3)
        self.done = self.size = self.size if self.size is not None else max(self.done, 1)
        self._tell()
        self.current = None

    def expect(self, total: int) -> None:
        """The running stage turns out to have ``total`` steps."""
        self.size = total
        self._tell()

    def tick(self, *_: Any) -> None:
        """One more step of the running stage."""
        if self.current is not None:
            self.done += 1
            self._tell()

    def _tell(self) -> None:
        if self.progress is not None and self.current is not None:
            self.progress(self.current, self.done, self.size)

    def total(self) -> float:
        return round(time.perf_counter() - self._start, 3)

    def cpu_total(self) -> float:
        return round(time.process_time() - self._cpu_start, 3)


class Counted:
    """A loader that counts each batch it yields as a step of the running stage; in every other
    respect (length, sampler, generator, dataset) the loader itself."""

    def __init__(self, loader: Iterable, stages: Stages) -> None:
        self._loader, self._stages = loader, stages

    def __iter__(self) -> Iterator[Any]:
        for batch in self._loader:
            yield batch
            self._stages.tick()

    def __len__(self) -> int:
        return len(self._loader)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_loader":
            raise AttributeError(name)
        return getattr(self._loader, name)


def counted(bundle: DataBundle, stages: Stages) -> DataBundle:
    loaders = {
        name: Counted(loader, stages)
        for name in ("train_loader", "val_loader", "test_loader")
        if (loader := getattr(bundle, name)) is not None
    }
    return dataclasses.replace(bundle, **loaders)


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


class LoadSampler:
    """The machine's 1-minute load average every ``interval`` seconds, on a daemon thread."""

    def __init__(self, interval: float = LOAD_SAMPLE_SECONDS) -> None:
        self.interval, self.start = interval, load_average()
        self.samples: list[list[float]] = []
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decomp-demo-load", daemon=True)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            load = load_average()
            if load is not None:
                self.samples.append([round(time.perf_counter() - self._t0, 1), load[0]])
            if self._stop.wait(self.interval):
                return

    def record(self) -> dict[str, Any]:
        """Start and latest load averages (1, 5, 15 min) and the 1-minute samples."""
        ones = [load for _, load in self.samples]
        return {
            "start": self.start,
            "latest": load_average(),
            "interval_s": self.interval,
            "samples_1min": list(self.samples),
            "mean_1min": round(sum(ones) / len(ones), 2) if ones else None,
            "max_1min": max(ones) if ones else None,
        }
