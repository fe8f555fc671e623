"""The inheritance schedule: at which denoising steps each UNet runs its full graph, and which UNet
serves which steps (multi-UNet switching).

Sampling modes (over step indices 0..steps-1 of the scheduler's timesteps):
  * ``uniform:N``: full at every N-th step (0, N, 2N, ...), DeepCache's default;
  * ``quadratic:N[:CENTER[:POW]]``: as many full steps as uniform:N, spread non-uniformly, dense around
    step CENTER (DeepCache's ``sample_from_quad_center``; defaults CENTER = steps // 3, POW = 1.4);
  * ``explicit:0,3,7,...``: the full steps listed;
  * ``full``: every step full (no inheritance).

Switching: ``teacher:0-9,student:10-19`` names the UNet serving each step range. A UNet's cached
features are its own, so the first step of every UNet segment is forced to be a full step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..artifacts import QUADRATIC_POWER, SCHEDULE_MODES as MODES, schedule_problem
from ..errors import InputError


def quadratic_full_steps(steps: int, n_full: int, center: int, power: float) -> list[int]:
    """DeepCache's non-uniform sampling (``sample_from_quad_center``), same arithmetic: a linear grid
    from (-center)**(1/p) (Python's power: a complex number for center > 0 and p > 1, 0.0 for center 0, as in
    DeepCache, whose rounding near integers differs between the two) to (steps-center)**(1/p), raised to p,
    real part truncated, shifted by ``center``; p drops by 0.02 until ``n_full`` distinct steps."""
    if n_full >= steps:
        return list(range(steps))
    p = power
    while p > 1:
        grid = np.linspace((-center) ** (1 / p), (steps - center) ** (1 / p), n_full + 1)
        values = np.unique(np.real(grid**p).astype(np.int32))
        idx = [0] + [int(v) + center for v in values[1:-1]]
        if len(idx) == n_full:
            return sorted(idx)
        p -= 0.02
    raise InputError(f"quadratic schedule: cannot place {n_full} full steps among {steps} around step {center}; "
                     "change the interval or the center")


DEFAULT_STEPS = 50


def default_schedule(inheriting: bool) -> str:
    """The schedule of an export that names none: DeepCache's ``uniform:3`` where there is an inherit graph to run,
    else ``full``."""
    return "uniform:3" if inheriting else "full"


@dataclass(frozen=True)
class Schedule:
    steps: int
    mode: str = "full"
    interval: int = 1
    center: int | None = None
    power: float = QUADRATIC_POWER
    explicit: tuple[int, ...] = ()
    switch: tuple[tuple[str, int, int], ...] = ()  # (unet name, first step, last step)

    # ---- parsing -----------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, steps: int, switch: str | None = None, unets: tuple[str, ...] = ("unet",)):
        """``text`` as in the module docstring; ``switch`` as ``name:0-9,name:10-19``."""
        if steps < 1:
            raise InputError("--steps must be at least 1")
        mode, _, rest = (text or "full").partition(":")
        args = [a for a in rest.split(":") if a] if mode != "explicit" else []
        takes = {"full": 0, "uniform": 1, "quadratic": 3}.get(mode)
        if takes is not None and len(args) > takes:  # "full:3" ran as full, silently
            raise InputError(f"bad schedule '{text}': {mode} takes {takes or 'no'} value{'s' * (takes != 1)} after "
                             "it; expected e.g. uniform:3, quadratic:3:10:1.4, explicit:0,4,9 or full")
        try:
            if mode == "full":
                sched = cls(steps)
            elif mode == "uniform":
                sched = cls(steps, "uniform", interval=int(args[0]))
            elif mode == "quadratic":
                sched = cls(steps, "quadratic", interval=int(args[0]),
                            center=int(args[1]) if len(args) > 1 else None,
                            power=float(args[2]) if len(args) > 2 else QUADRATIC_POWER)
            elif mode == "explicit":
                sched = cls(steps, "explicit", explicit=tuple(sorted({int(s) for s in rest.split(",") if s})))
            else:
                raise InputError(f"unknown schedule mode '{mode}'; choose one of {', '.join(MODES)}")
        except (ValueError, IndexError) as err:
            raise InputError(f"bad schedule '{text}': expected e.g. uniform:3, quadratic:3:10:1.4, "
                             "explicit:0,4,9 or full") from err
        if sched.center is not None and not 0 <= sched.center < steps:
            raise InputError(f"bad schedule '{text}': the quadratic schedule's centre is the step its full steps "
                             f"crowd around, one of 0..{steps - 1}")
        sched = cls(**{**sched.__dict__, "switch": parse_switch(switch, steps, unets)})
        sched.validate(unets)
        return sched

    def validate(self, unets: tuple[str, ...]) -> None:
        """InputError for a schedule no run can follow (the rules a manifest's schedule is read with, and
        the placement of its full steps)."""
        if problem := schedule_problem(self.__dict__, unets):
            raise InputError(problem)
        # a quadratic schedule that cannot be placed is refused now, not after the export traced
        if any(not 0 <= s < self.steps for s in self.full_steps()):
            raise InputError(f"the schedule's full steps {self.full_steps()} do not all lie in 0..{self.steps - 1}")

    # ---- queries -----------------------------------------------------------------------------------
    def with_steps(self, steps: int) -> "Schedule":
        """The same policy for another step count (explicit schedules and switches cannot stretch)."""
        if steps == self.steps:
            return self
        if self.mode == "explicit" or self.switch:
            raise InputError(f"this bundle's schedule is fixed at {self.steps} steps (explicit steps or UNet "
                             f"switching); run with --steps {self.steps}")
        if self.center is not None and self.center >= steps:  # as parse refuses it: not extrapolated
            raise InputError(f"this bundle's quadratic schedule crowds its full steps around step {self.center}; "
                             f"run with more than {self.center} steps")
        return Schedule(**{**self.__dict__, "steps": steps})

    def full_steps(self) -> list[int]:
        if self.mode == "full":
            full = set(range(self.steps))
        elif self.mode == "uniform":
            # counted from the start of each UNet segment, so every UNet gets the same rhythm
            segments = [(a, b) for _, a, b in self.switch] or [(0, self.steps - 1)]
            full = {s for a, b in segments for s in range(a, b + 1, self.interval)}
        elif self.mode == "quadratic":
            n_full = -(-self.steps // self.interval)
            center = self.steps // 3 if self.center is None else self.center
            full = set(quadratic_full_steps(self.steps, n_full, center, self.power))
        else:
            full = set(self.explicit)
        full |= {first for _, first, _ in self.switch}  # a new UNet starts with an empty cache
        return sorted(full | {0})

    def unet_at(self, step: int, default: str = "unet") -> str:
        for name, first, last in self.switch:
            if first <= step <= last:
                return name
        return default

    def plan(self, default: str = "unet") -> list[tuple[str, str]]:
        """(unet, "full" | "inherit") for every step."""
        full = set(self.full_steps())
        return [(self.unet_at(i, default), "full" if i in full else "inherit") for i in range(self.steps)]

    def to_json(self) -> dict:
        return {"steps": self.steps, "mode": self.mode, "interval": self.interval, "center": self.center,
                "power": self.power, "explicit": list(self.explicit),
                "switch": [list(s) for s in self.switch], "full_steps": self.full_steps()}

    @classmethod
    def from_json(cls, d: dict) -> "Schedule":
        return cls(steps=d["steps"], mode=d["mode"], interval=d["interval"], center=d.get("center"),
                   power=d.get("power", QUADRATIC_POWER), explicit=tuple(d.get("explicit", ())),
                   switch=tuple(tuple(s) for s in d.get("switch", ())))


def parse_switch(text: str | None, steps: int, unets: tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
    if not text:
        return ()
    segments = []
    try:
        for part in text.split(","):
            name, _, rng = part.partition(":")
            first, _, last = rng.partition("-")
            segments.append((name.strip(), int(first), int(last or first)))
    except ValueError as err:
        raise InputError(f"bad --switch '{text}': expected NAME:FIRST-LAST,... e.g. teacher:0-9,student:10-19") from err
    return tuple(segments)  # checked by Schedule.validate: names first, then the steps they cover
