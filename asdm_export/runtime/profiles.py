"""Engine profiles as engine folders record them: ``{input: {min, opt, max}}`` per engine, None for an engine
that takes any shape (an ONNX graph). Which engine runs which shapes: the TensorRT backend, the loop of a Triton
deployment and the builder's records all decide it here, none of them needing TensorRT for it."""

from __future__ import annotations


def is_static(profile: dict | None) -> bool:
    """An engine of one shape per input (fastest, and CUDA-graph replayable)."""
    return bool(profile) and all(p["min"] == p["max"] for p in profile.values())


def profile_covers(profile: dict | None, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether an engine of this profile takes inputs of these shapes."""
    if profile is None:
        return True
    for name, p in profile.items():
        shape = shapes.get(name)
        if shape is None or len(shape) != len(p["min"]) or not all(
                lo <= s <= hi for lo, s, hi in zip(p["min"], shape, p["max"])):
            return False
    return True


def select_engine(records: list[dict], shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Index of the engine record (``{"profile": ...}``) to run ``shapes`` on: a static engine of exactly these
    shapes first, else the first whose profile covers them."""
    static = [i for i, r in enumerate(records) if is_static(r["profile"])]
    for i in [*static, *(i for i in range(len(records)) if i not in static)]:
        if profile_covers(records[i]["profile"], shapes):
            return i
    return None


def profile_points(profiles: list[dict]) -> list[dict[str, tuple[int, ...]]]:
    """Each profile's min, opt and max shapes, once each."""
    points = []
    for profile in profiles:
        for key in ("min", "opt", "max"):
            point = {name: tuple(p[key]) for name, p in profile.items()}
            if point not in points:
                points.append(point)
    return points


def describe_profile(profile: dict) -> str:
    return ", ".join(f"{n} {p['min']}..{p['max']}" for n, p in profile.items())
