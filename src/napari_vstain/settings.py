"""The sampler table and the staining settings: one source of truth, without torch.

The CLI (`vstain stain`, `evaluate`, `demo`), the napari dock, the evaluation and the
provenance records all read this module; nothing else types a sampler name, a default or a
range. It imports nothing heavy, so `vstain --help` and napari start fast.

The time grid of a run is built here, once (`StainSettings.grid`), and handed to the engine's
sampler, so the dock and the CLI run the same network-call times for the same settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

ALL_STEPS = "T"  # a Setting's maximum that is the model's number of bridge steps


@dataclass(frozen=True)
class Setting:
    """One sampling setting: its CLI option, dock label, default, range and meaning."""

    option: str
    label: str
    default: object
    minimum: float
    maximum: object  # a number, ALL_STEPS (the model's T) or None (no limit)
    help: str

    def check(self, value, num_steps: Optional[int], option: Optional[str] = None) -> None:
        """Refuse a value out of range with a sentence that names the option and the range.
        num_steps None: the model's T is not known yet (only the lower bound is checked).
        `option`: the command's own name for this setting, when it differs."""
        top = num_steps if self.maximum == ALL_STEPS else self.maximum
        if value is None or value != value or value < self.minimum or (
                top is not None and value > top):
            allowed = (f"from {self.minimum:,g} to {top:,g}" if top is not None
                       else f"at least {self.minimum:,g}")
            limit = " (the model's T)" if self.maximum == ALL_STEPS else ""
            raise ValueError(f"{self.label} ({option or self.option}) must be {allowed}{limit}; "
                             f"got {value}.")


SETTINGS = {
    "steps": Setting("--steps", "Steps", None, 1, ALL_STEPS,
                     "network steps per sample, evenly respaced over the T training steps"),
    "t_exit": Setting("--t-exit", "t_e", 50, 0, ALL_STEPS,
                      "exit step t_e: mean sampling adds no posterior noise below it, skip "
                      "sampling returns its estimate there"),
    "eta": Setting("--eta", "eta", 0.0, 0.0, 1.0,
                   "noise of the fast sampler: 0 deterministic, 1 the full bridge posterior"),
    "samples": Setting("--samples", "Samples N", 4, 1, 1000,
                       "samples averaged into the output and used for the CV map"),
    "seed": Setting("--seed", "Seed", 0, 0, 2_147_483_647,
                    "random seed: same seed, same image, whatever the tiles or batches"),
}

DEFAULT_CONVENTION = "exact"
AUTHORS_CONVENTION = "authors-code"
CONVENTIONS = {
    DEFAULT_CONVENTION: "the exact Brownian bridge posterior",
    AUTHORS_CONVENTION: "as the paper authors' released sampler: posterior variance with the "
                    "ratio delta_t / delta_(t-1), network given t - 1 at step t (to "
                    "reproduce their published images with weights from `vstain "
                    "import-weights`)",
}


@dataclass(frozen=True)
class Sampler:
    """A row of the sampler table. `takes`: the settings it uses besides N and the seed,
    named as StainSettings fields (and as the engine sampler's keyword arguments);
    `default_steps`: None means all T steps."""

    name: str
    description: str
    takes: tuple
    default_steps: Optional[int]
    noise: str  # which steps add noise: "every" step, steps "above_exit", or "eta"-scaled
    ends_at_exit: bool = False  # returns the network's estimate at t_e


SAMPLERS = {sampler.name: sampler for sampler in (
    Sampler("fast", "the deterministic bridge sampler (eta = 0; eta > 0 adds noise): few "
            "steps, the default",
            ("steps", "eta"), 5, "eta"),
    Sampler("mean", "the paper's mean sampling: posterior noise on steps above t_e, the "
            "posterior mean below it", ("steps", "t_exit", "convention"), None, "above_exit"),
    Sampler("skip", "the paper's skip sampling: stochastic steps down to t_e, then the "
            "network's estimate there", ("steps", "t_exit", "convention"), None, "every",
            ends_at_exit=True),
    Sampler("vanilla", "the paper's stochastic ancestral sampler (posterior noise on every "
            "step)", ("steps", "convention"), None, "every"),
)}
DEFAULT_SAMPLER = next(iter(SAMPLERS))
# Settings that depend on the sampler (the others, N and the seed, every sampler takes).
PER_SAMPLER = tuple(dict.fromkeys(name for s in SAMPLERS.values() for name in s.takes))


def sampler_help() -> str:
    """One line per sampler, for `--help` and the dock's tooltip."""
    return "; ".join(f"{s.name}: {s.description}" for s in SAMPLERS.values())


def sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.")
    return SAMPLERS[name]


def steps_are_stochastic(t: int, t_exit: int) -> bool:
    """Mean sampling: a step from t adds posterior noise only above the exit step, so the
    last noisy step lands on t_e (as in the authors' code)."""
    return t > t_exit


# ---- the time grid ---------------------------------------------------------------------------

def _even_times(start: int, stop: int, steps: int) -> list:
    """`steps` evenly spaced steps from `start` down to `stop` (integers, both included).
    Rounds half up, so the times strictly decrease whenever steps <= start - stop."""
    return [int((start + (stop - start) * i / steps) + 0.5) if i < steps else stop
            for i in range(steps + 1)]


def time_grid(sampler_name: str, num_steps: int, steps: Optional[int] = None,
              t_exit: Optional[int] = None) -> tuple:
    """The decreasing times T = t_0 > t_1 > ... a sample walks through.

    `steps` (default: the sampler's) steps are spread evenly over T..0. For mean and skip
    they are split between T..t_e and t_e..0 in proportion to the lengths, so t_e is always
    a grid point; skip replaces the steps below t_e by one network call at t_e, so its grid
    ends there. No sampler calls the network at t = 0 (the walk ends there instead)."""
    spec = sampler(sampler_name)
    steps = num_steps if steps is None and spec.default_steps is None else (
        spec.default_steps if steps is None else int(steps))
    SETTINGS["steps"].check(steps, num_steps)
    if "t_exit" not in spec.takes:
        return tuple(_even_times(num_steps, 0, steps))
    SETTINGS["t_exit"].check(t_exit, num_steps)
    below = min(t_exit, max(1 if t_exit > 0 else 0, int(steps * t_exit / num_steps + 0.5)))
    above = steps - below
    if t_exit < num_steps and above < 1:
        above, below = 1, steps - 1
    if above > num_steps - t_exit:
        above, below = num_steps - t_exit, steps - (num_steps - t_exit)
    if t_exit > 0 and below < 1:
        raise ValueError(f"{spec.name} sampling with t_e = {t_exit} needs at least 2 steps "
                         f"(one above t_e, one below); got {steps}.")
    grid = _even_times(num_steps, t_exit, above) if above else [num_steps]
    if spec.ends_at_exit:
        return tuple(grid)
    return tuple(grid + _even_times(t_exit, 0, below)[1:])


def call_times(grid: tuple) -> list:
    """The times at which the network is called: every grid time but the final 0 (skip
    also calls at its last grid time, t_e, to return the estimate there)."""
    return list(grid if grid[-1] > 0 else grid[:-1])


# ---- the settings of one run -----------------------------------------------------------------

@dataclass
class StainSettings:
    """How to sample; the defaults come from the tables above. `steps` None: the sampler's
    default (`Sampler.default_steps`)."""

    sampler: str = DEFAULT_SAMPLER
    steps: Optional[int] = None
    t_exit: int = SETTINGS["t_exit"].default
    eta: float = SETTINGS["eta"].default
    samples: int = SETTINGS["samples"].default
    seed: int = SETTINGS["seed"].default
    convention: str = DEFAULT_CONVENTION

    def validate(self, num_steps: int) -> "StainSettings":
        """Refuse bad settings with a sentence that says what to change."""
        spec = sampler(self.sampler)
        for name in ("eta", "samples", "seed"):
            SETTINGS[name].check(getattr(self, name), num_steps)
        if self.convention not in CONVENTIONS:
            raise ValueError(f"Unknown convention {self.convention!r}; choose one of "
                             f"{', '.join(CONVENTIONS)}.")
        if self.convention != DEFAULT_CONVENTION and "convention" not in spec.takes:
            with_variant = [s.name for s in SAMPLERS.values() if "convention" in s.takes]
            raise ValueError(f"The {spec.name} sampler has no {self.convention} variant; "
                             f"choose one of {', '.join(with_variant)}.")
        self.grid(num_steps)  # checks steps and t_e
        return self

    def grid(self, num_steps: int) -> tuple:
        return time_grid(self.sampler, num_steps, self.steps, self.t_exit)

    def call_times(self, num_steps: int) -> list:
        return call_times(self.grid(num_steps))

    def calls_per_sample(self, num_steps: int) -> int:
        return len(self.call_times(num_steps))

    def sampler_arguments(self) -> dict:
        """The keyword arguments of the engine's sampler function (the grid aside)."""
        return {name: getattr(self, name) for name in sampler(self.sampler).takes
                if name != "steps"}

    def record(self, num_steps: int) -> dict:
        """What runs, for provenance: settings the sampler does not take are None."""
        takes = sampler(self.sampler).takes
        return {"sampler": self.sampler, "steps": len(self.grid(num_steps)) - 1,
                "network_call_times": self.call_times(num_steps),
                "network_calls_per_sample": self.calls_per_sample(num_steps),
                "t_exit": self.t_exit if "t_exit" in takes else None,
                "eta": self.eta if "eta" in takes else None,
                "convention": self.convention if "convention" in takes else None,
                "samples": self.samples, "seed": self.seed}

    def describe(self, num_steps: int, tiles: int = 1) -> str:
        """What will run, e.g. 'mean: 4 stochastic steps + 1 deterministic step, 5 calls per
        sample, N = 4: 20 network calls' (with `tiles` > 1: 'N = 4, 9 tiles: 180 network
        calls'; the progress of a run counts the same calls)."""
        spec, grid = sampler(self.sampler), self.grid(num_steps)
        steps = list(zip(grid[:-1], grid[1:]))
        # A step adds noise when its sampler says so, except the step to 0, which returns
        # the estimate (the first step of a deterministic run draws one booting noise).
        noisy = sum(s > 0 and (spec.noise == "every"
                               or (spec.noise == "eta" and self.eta > 0)
                               or (spec.noise == "above_exit"
                                   and steps_are_stochastic(t, self.t_exit)))
                    for t, s in steps)
        parts = [f"{count} {kind} step{'s' if count != 1 else ''}" for count, kind in
                 ((noisy, "stochastic"), (len(steps) - noisy, "deterministic")) if count]
        if spec.noise == "eta" and self.eta > 0:
            parts[0] += f" (eta = {self.eta:g})"
        if grid[-1] > 0:
            parts.append(f"the estimate at t = {grid[-1]}")
        calls = len(call_times(grid))
        total = calls * self.samples * tiles
        where = f", {tiles} tiles" if tiles > 1 else ""
        return (f"{self.sampler}: {' + '.join(parts)}, {calls} call{'s' if calls != 1 else ''}"
                f" per sample, N = {self.samples}{where}: {total} network call"
                f"{'s' if total != 1 else ''}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- command-line options (argparse), read from the tables above ------------------------------

def add_setting_argument(parser, name: str, **overrides) -> None:
    """Add the option of SETTINGS[name] with its help and default (None for the settings a
    sampler may not take, so that an explicit value can be checked against the sampler)."""
    setting = SETTINGS[name]
    kind = float if isinstance(setting.default, float) else int
    default = overrides.pop("default", None if name in PER_SAMPLER else setting.default)
    shown = {"steps": ", ".join(f"{s.default_steps or 'all T'} for {s.name}"
                                for s in SAMPLERS.values())}.get(name, setting.default)
    parser.add_argument(setting.option, type=kind, default=default,
                        help=overrides.pop("help", f"{setting.help} (default {shown})"),
                        **overrides)


def add_sampler_arguments(parser) -> None:
    """--sampler, --steps, --t-exit, --eta, --convention, --samples and --seed."""
    parser.add_argument("--sampler", choices=list(SAMPLERS), default=DEFAULT_SAMPLER,
                        help=f"{sampler_help()} (default {DEFAULT_SAMPLER})")
    for name in SETTINGS:
        add_setting_argument(parser, name)
    parser.add_argument("--convention", choices=list(CONVENTIONS), default=None,
                        help="; ".join(f"{k}: {v}" for k, v in CONVENTIONS.items())
                        + f" (default {DEFAULT_CONVENTION})")


def settings_from_arguments(args) -> StainSettings:
    """StainSettings from parsed `add_sampler_arguments` options. An option the chosen
    sampler does not take is refused rather than silently ignored."""
    spec = sampler(args.sampler)
    for name in PER_SAMPLER:
        if getattr(args, name, None) is not None and name not in spec.takes:
            takers = [s.name for s in SAMPLERS.values() if name in s.takes]
            option = SETTINGS[name].option if name in SETTINGS else "--convention"
            raise ValueError(f"{option} does not apply to the {spec.name} sampler; it is for "
                             f"{', '.join(takers)}.")
    given = {name: getattr(args, name) for name in (*SETTINGS, "convention")
             if getattr(args, name, None) is not None}
    return StainSettings(sampler=spec.name, **given)
