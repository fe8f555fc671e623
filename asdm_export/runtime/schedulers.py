"""The samplers ``--scheduler`` names (``run``, ``quality``, ``serve``, ``triton-repo``; ``AsdmPipeline``'s
``scheduler``), in place of the model's own scheduler.

Each is a diffusers scheduler class built from the model's scheduler config, as diffusers users swap them
(``DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``): the noise table (betas, training
timesteps), the prediction type and the timestep spacing stay the model's, and the options below are set on top.
The denoising loop takes any of them (``runtime/denoise.py``: Heun and PNDM call the UNet more than once per step,
and uniform and quadratic inheritance schedules stretch over those calls).
"""

from __future__ import annotations

from ..errors import InputError

# name: (diffusers class, config set on top of the model's)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                    "use_karras_sigmas": False}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def check_scheduler(name: str | None) -> None:
    """InputError unless ``name`` is None (the model's own) or a key of ``SCHEDULERS``."""
    if name is not None and (not isinstance(name, str) or name not in SCHEDULERS):
        raise InputError(f"unknown scheduler {name!r:.40}; choose one of {', '.join(SCHEDULERS)}")


def check_fits(manifest: dict, scheduler) -> None:
    """InputError where ``scheduler`` cannot follow the folder's schedule (explicit steps or UNet switching, with a
    scheduler that calls the UNet more than once per step): said as the folder is opened, or as a server or a
    deployment is written, not at every request."""
    from ..graphs.schedule import Schedule
    from .denoise import call_plan

    schedule = Schedule.from_json(manifest["schedule"])
    scheduler.set_timesteps(schedule.steps)
    call_plan(manifest, schedule, scheduler)


def folder_scheduler(folder, manifest: dict, name: str | None):
    """The scheduler a bundle or engine folder runs with: its own (``scheduler/``), or ``name`` built from its
    config and checked against the folder's schedule (its own was, at export)."""
    from pathlib import Path

    from ..errors import first_line
    from ..models.loading import load_scheduler

    check_scheduler(name)  # before the folder is read
    where = Path(folder) / manifest["pipeline"]["scheduler"]
    try:
        own = load_scheduler(where)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise InputError(f"cannot read the scheduler in '{where}' ({first_line(err, with_type=True)}); "
                         "re-create the folder") from None
    scheduler = scheduler_named(name, own)
    if name is not None:
        check_fits(manifest, scheduler)
    return scheduler


def scheduler_named(name: str | None, own):
    """The scheduler ``name`` (a key of ``SCHEDULERS``) built from the config of ``own``, the model's scheduler;
    ``own`` itself for None."""
    check_scheduler(name)
    if name is None:
        return own
    import diffusers

    cls, extra = SCHEDULERS[name]
    return getattr(diffusers, cls).from_config({**own.config, **extra})


def scheduler_name(scheduler) -> str:
    """The ``SCHEDULERS`` name of ``scheduler`` where one matches it, else its class name (a model's own)."""
    config = scheduler.config
    for name, (cls, extra) in SCHEDULERS.items():
        if type(scheduler).__name__ == cls and all(config.get(k) == v for k, v in extra.items()):
            return name
    return type(scheduler).__name__
