"""Energy and emissions with CodeCarbon's offline tracker (no network), per study and per run.

One :class:`EnergyMeter` per worker process measures each study as a CodeCarbon *task* (``start_task`` /
``stop_task``) of an ``OfflineEmissionsTracker``. What CodeCarbon can measure depends on the machine, and
:attr:`EnergyReading.method` says which it was: Intel RAPL counters when ``/sys/class/powercap`` is readable,
otherwise an **estimate** of CPU power from the CPU load times a TDP (CodeCarbon's table, or 4 W per thread for
unknown CPUs), RAM power from the memory size, and NVIDIA GPUs through NVML. Emissions are energy times the
carbon intensity of the country's grid (``country``: ISO 3166 alpha-3, e.g. ``CHE``; default: CodeCarbon's
world average). Without CodeCarbon, or when it fails, readings carry ``None`` and the reason in ``method``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

from ..errors import InputError


@dataclass
class EnergyReading:
    """Energy of one study or run. ``*_kwh`` energies, ``emissions_kg`` CO2-equivalent, ``duration_s`` as
    CodeCarbon timed it; ``method``: what was measured and how (see the module docstring)."""

    energy_kwh: Optional[float] = None
    emissions_kg: Optional[float] = None
    cpu_kwh: Optional[float] = None
    ram_kwh: Optional[float] = None
    gpu_kwh: Optional[float] = None
    duration_s: Optional[float] = None
    method: str = "not measured"
    country: str = ""

    @property
    def energy_wh(self) -> Optional[float]:
        return None if self.energy_kwh is None else self.energy_kwh * 1000.0


def check_country(code: Optional[str]) -> Optional[str]:
    """``code`` upper-cased if it is an ISO 3166 alpha-3 country code CodeCarbon knows, else InputError."""
    if not code:
        return None
    code = code.strip().upper()
    try:
        from codecarbon.input import DataSource

        known = DataSource().get_global_energy_mix_data()
    except Exception:  # noqa: BLE001 - without CodeCarbon's data only the form is checked
        known = None
    if len(code) != 3 or not code.isalpha() or (known is not None and code not in known):
        raise InputError(f"--country {code}: not an ISO 3166 alpha-3 country code CodeCarbon knows (e.g. CHE, "
                         f"DEU, FRA, GBR, USA)")
    return code


def _describe(tracker) -> str:
    """What the tracker measures, e.g. ``"CPU(Cpu Load) + RAM() (tracking process)"``."""
    try:
        parts = [h.description() for h in tracker._hardware]  # CodeCarbon's own names of its sources
    except Exception:  # noqa: BLE001
        parts = []
    text = " + ".join(parts) or "CodeCarbon"
    notes = []
    if any("Load" in p or "Constant" in p or p == "CPU()" for p in parts):
        notes.append("CPU power estimated from load x TDP (no RAPL access)")
    if "RAM()" in parts:
        notes.append("RAM power estimated from the memory size")
    return text + (": " + "; ".join(notes) if notes else "")


class EnergyMeter:
    """Per-task energy of this process (``tracking_mode="process"``: CPU load of this process) or of the
    whole machine (``"machine"``). :meth:`measure` is a context manager yielding the reading it fills."""

    def __init__(self, country: Optional[str] = None, tracking_mode: str = "process",
                 enabled: bool = True) -> None:
        self.country = country or ""
        self.tracker = None
        self.reason = "disabled (--no-energy)" if not enabled else ""
        if not enabled:
            return
        try:
            from codecarbon import OfflineEmissionsTracker

            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            kwargs = {"country_iso_code": country} if country else {}
            self.tracker = OfflineEmissionsTracker(output_methods=[], log_level="error",
                                                   tracking_mode=tracking_mode, measure_power_secs=1, **kwargs)
            self.tracker.get_detected_hardware()  # detect the hardware now, not in the first study's time
            self.method = _describe(self.tracker)
        except Exception as exc:  # noqa: BLE001 - energy is optional: say why it is missing
            self.tracker = None
            self.reason = f"unavailable ({type(exc).__name__}: {exc})"

    def start(self, name: str) -> float:
        """Start measuring task ``name``; returns the start time (``perf_counter``)."""
        if self.tracker is not None:
            try:
                self.tracker.start_task(name)
            except Exception as exc:  # noqa: BLE001
                self.reason = f"failed ({type(exc).__name__}: {exc})"
                self.tracker = None
        return time.perf_counter()

    def stop(self) -> EnergyReading:
        """The reading of the task started last."""
        if self.tracker is None:
            return EnergyReading(method=self.reason or "unavailable", country=self.country)
        try:
            data = self.tracker.stop_task()
        except Exception as exc:  # noqa: BLE001
            return EnergyReading(method=f"failed ({type(exc).__name__}: {exc})", country=self.country)
        if data is None:
            return EnergyReading(method="failed (no task data)", country=self.country)
        return EnergyReading(float(data.energy_consumed), float(data.emissions), float(data.cpu_energy),
                             float(data.ram_energy), float(data.gpu_energy), float(data.duration), self.method,
                             self.country or "world average")


def total(readings: list[EnergyReading]) -> EnergyReading:
    """The sum of several readings (``None`` when none was measured)."""
    measured = [r for r in readings if r.energy_kwh is not None]
    if not measured:
        return EnergyReading(method=readings[0].method if readings else "not measured")

    def add(name: str) -> Optional[float]:
        values = [getattr(r, name) for r in measured if getattr(r, name) is not None]
        return float(sum(values)) if values else None

    return EnergyReading(add("energy_kwh"), add("emissions_kg"), add("cpu_kwh"), add("ram_kwh"), add("gpu_kwh"),
                         add("duration_s"), measured[0].method, measured[0].country)
