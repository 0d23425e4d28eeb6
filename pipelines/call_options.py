"""The options of a generation call, checked in one place before any model is loaded or network evaluated.

`check_call_options(...)` validates everything that does not depend on the model and returns it as a frozen
`CallOptions`; `Pipeline.__call__` runs it first, and `ldm generate` runs it on its parsed arguments before loading the
model. A bad value is an `OptionError` (a ValueError) naming the option, the value and the valid range:

    num_inference_steps must be an integer in [1, 1000], got 0

`OptionError.message(names)` words it with other names (the CLI's: `--steps must be ...`). What needs the model (sizes
a multiple of the VAE factor, steps <= the schedule's training steps, cache_depth below the U-Net's branches, the
memory estimate of pipelines/memory.py) is checked by the pipeline after loading, still before any network runs.

Ranges: steps 1-1000 (MAX_STEPS); guidance scale 0-100 (MAX_GUIDANCE; 1 is the conditional model alone, 0 the
unconditional one); guidance rescale phi 0-1; guidance interval 0 <= lo < hi (hi may be inf); strength (0, 1]; eta
0-1 and only for samplers whose function takes it; clip_skip an integer >= 0 (below the text encoder's layer count,
checked after loading); prompt_syntax "plain" or "a1111"; sizes and counts integers >= 1 (the memory estimate bounds
them); seeds integers in [0, 2**64); every float finite (NaN and inf are refused).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ldm.diffusion.samplers import SAMPLERS
from ldm.diffusion.sigma_schedules import SIGMA_SCHEDULES
from ldm.networks.prompt_syntax import SYNTAXES
from ldm.random import SEED_SPACE, check_seed

MAX_STEPS = 1000  # a schedule's usual num_train_timesteps; checked against the model's own after loading
MAX_GUIDANCE = 100.0  # past ~20 images saturate; larger scales only overflow half-precision networks
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


class OptionError(ValueError):
    """A call option outside its valid range: `{option} must be {requirement}, got {value!r}[: {hint}]`, or, for an
    unknown name or a combination of options, `text` with the option's name in place of "{option}"."""

    def __init__(self, option: str, value: Any, requirement: str = "", hint: str = "", *, text: str = "") -> None:
        self.option, self.value, self.requirement, self.hint, self.text = option, value, requirement, hint, text
        super().__init__(self.message())

    def message(self, names: Mapping[str, str] | None = None) -> str:
        """The message with the option renamed by `names` (e.g. {"num_inference_steps": "--steps"})."""
        name = (names or {}).get(self.option, self.option)
        if self.text:
            return self.text.replace("{option}", name)
        return f"{name} must be {self.requirement}, got {self.value!r}" + (f": {self.hint}" if self.hint else "")


@dataclass(frozen=True)
class CallOptions:
    """The model-independent options of one call, checked. `num_inference_steps` and `sampler` None: the model's
    defaults (Pipeline.sampling_defaults), resolved after loading."""

    prompts: tuple[str, ...]
    negatives: tuple[str, ...]
    num_inference_steps: int | None
    guidance_scale: float
    guidance_rescale: float
    guidance_interval: tuple[float, float] | None
    sampler: str | None
    height: int | None
    width: int | None
    seed: int | tuple[int, ...] | None  # the first image's (image i: seed + i), one per image, or None: random
    num_images_per_prompt: int
    strength: float
    output_type: str
    sigma_schedule: str | None
    karras_sigmas: bool | None
    eta: float | None
    cache_interval: int
    cache_depth: int
    clip_skip: int | None = None  # diffusers' clip_skip; None: the text encoder's own layer
    prompt_syntax: str = "plain"  # "a1111": emphasis (ldm.networks.prompt_syntax)

    @property
    def text_options(self) -> dict[str, Any]:
        """This call's options of the text encoder (PromptEncoder.encode / encode_pair keywords)."""
        return {"clip_skip": self.clip_skip, "syntax": self.prompt_syntax}

    @property
    def num_images(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    def seeds(self) -> list[int] | None:
        """One seed per image: seed + i modulo 2**64, the list given, or None (drawn at random)."""
        if self.seed is None or isinstance(self.seed, tuple):
            return None if self.seed is None else list(self.seed)
        return [(self.seed + i) % SEED_SPACE for i in range(self.num_images)]


def check_call_options(
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float = 7.5,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
    sampler: str | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int | Sequence[int] | None = None,
    num_images_per_prompt: int = 1,
    strength: float | None = 0.8,
    output_type: str = "pil",
    sigma_schedule: str | None = None,
    karras_sigmas: bool | None = None,
    eta: float | None = None,
    cache_interval: int | None = None,
    cache_depth: int = 0,
    callback: Callable[..., Any] | None = None,
    *,
    img2img: bool = False,
    inpaint: bool = False,
    clip_skip: int | None = None,
    prompt_syntax: str = "plain",
) -> CallOptions:
    """Check the model-independent options of a call (those of `Pipeline.__call__`, same names and defaults;
    `img2img`: an init image is given, `inpaint`: a mask too; strength None: 1.0 with a mask, as diffusers'
    StableDiffusionInpaintPipeline, else 0.8, as its img2img pipeline); an OptionError (or, for a prompt of the wrong
    type, a TypeError) names the first bad one."""
    prompts = _prompts(prompt)
    per_prompt = check_int("num_images_per_prompt", num_images_per_prompt, 1)
    steps = None if num_inference_steps is None else check_int("num_inference_steps", num_inference_steps, 1,
                                                                 MAX_STEPS)
    if sampler is not None and sampler not in SAMPLERS:
        raise OptionError("sampler", sampler, text=f"{{option}}: unknown sampler {sampler!r}; valid: {sorted(SAMPLERS)}")
    if eta is not None:
        eta = check_float("eta", eta, 0.0, 1.0)
        if sampler is not None:
            check_eta(sampler, eta)
    if sigma_schedule is not None and sigma_schedule not in SIGMA_SCHEDULES:
        raise OptionError("sigma_schedule", sigma_schedule, text=f"{{option}}: unknown sigma schedule "
                          f"{sigma_schedule!r}; valid: {', '.join(SIGMA_SCHEDULES)}")
    if karras_sigmas is not None and not isinstance(karras_sigmas, bool):
        raise OptionError("karras_sigmas", karras_sigmas, "True, False or None")
    if karras_sigmas is not None and sigma_schedule is not None and karras_sigmas != (sigma_schedule == "karras"):
        raise OptionError("karras_sigmas", karras_sigmas, text=f"{{option}}={karras_sigmas} contradicts "
                          f"sigma_schedule={sigma_schedule!r}: give one of them")
    if inpaint and not img2img:
        raise OptionError("mask_image", "given", text="{option} needs an image to inpaint: pass image= too")
    strength = check_float("strength", (1.0 if inpaint else 0.8) if strength is None else strength, 0.0, 1.0,
                           low_open=True)
    if steps is not None and img2img:
        check_strength_steps(strength, steps)
    if output_type not in OUTPUT_TYPES:
        raise OptionError("output_type", output_type, text=f"{{option}}: unknown output type {output_type!r}; "
                          f"valid: {', '.join(OUTPUT_TYPES)}")
    if prompt_syntax not in SYNTAXES:
        raise OptionError("prompt_syntax", prompt_syntax, text=f"{{option}}: unknown prompt syntax {prompt_syntax!r}; "
                          f"valid: {', '.join(SYNTAXES)}")
    if callback is not None and not callable(callback):
        raise OptionError("callback", callback, "a function (i, sigma, x, x0_hat) or None")
    n = len(prompts) * per_prompt
    return CallOptions(
        prompts=prompts,
        negatives=_negatives(negative_prompt, len(prompts)),
        num_inference_steps=steps,
        guidance_scale=check_float("guidance_scale", guidance_scale, 0.0, MAX_GUIDANCE),
        guidance_rescale=check_float("guidance_rescale", guidance_rescale, 0.0, 1.0),
        guidance_interval=check_guidance_interval(guidance_interval),
        sampler=sampler,
        height=None if height is None else check_int("height", height, 1),
        width=None if width is None else check_int("width", width, 1),
        seed=_seed_option(seed, n),
        num_images_per_prompt=per_prompt,
        strength=strength,
        output_type=output_type,
        sigma_schedule=sigma_schedule,
        karras_sigmas=karras_sigmas,
        eta=eta,
        cache_interval=1 if cache_interval is None else check_int("cache_interval", cache_interval, 1,
                                                                  note=" (1: no caching)"),
        cache_depth=check_int("cache_depth", cache_depth, 0),
        clip_skip=None if clip_skip is None else check_int("clip_skip", clip_skip, 0, note=" (layers skipped)"),
        prompt_syntax=prompt_syntax,
    )


# ------------------------------------------------------------------------------------------------- single values


def check_int(option: str, value: Any, low: int, high: int | None = None, *, note: str = "") -> int:
    """`value` as an int in [low, high] (high None: no bound); bools, floats and strings are refused."""
    valid = f"an integer >= {low}{note}" if high is None else f"an integer in [{low}, {high}]{note}"
    if isinstance(value, (bool, str, bytes)):
        raise OptionError(option, value, valid)
    try:
        number = operator.index(value)
    except TypeError:
        raise OptionError(option, value, valid) from None
    if number < low or (high is not None and number > high):
        raise OptionError(option, number, valid)
    return number


def check_float(option: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    """`value` as a finite float in [low, high] ((low, high] with low_open); NaN, inf and non-numbers are refused."""
    valid = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(option, value, valid)
    number = float(value)
    if not math.isfinite(number) or number > high or number < low or (low_open and number == low):
        raise OptionError(option, number, valid)
    return number


def check_guidance_interval(interval: Any) -> tuple[float, float] | None:
    """(lo, hi) noise levels with 0 <= lo < hi, lo finite (hi may be inf: no upper edge), or None."""
    if interval is None:
        return None
    valid = "(lo, hi) with 0 <= lo < hi in sigma (hi may be inf)"
    if isinstance(interval, (str, bytes)) or not isinstance(interval, Sequence) or len(interval) != 2:
        raise OptionError("guidance_interval", interval, valid)
    if any(isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v) for v in interval):
        raise OptionError("guidance_interval", tuple(interval), valid)
    lo, hi = float(interval[0]), float(interval[1])
    if not (0.0 <= lo < hi and math.isfinite(lo)):
        raise OptionError("guidance_interval", (lo, hi), valid)
    return lo, hi


def samplers_with_option(option: str) -> list[str]:
    """Names in `SAMPLERS` whose function takes the keyword `option` (e.g. "eta"), sorted."""
    return sorted(name for name, spec in SAMPLERS.items() if spec.accepts(option))


def check_strength_steps(strength: float, steps: int) -> None:
    """img2img runs the last int(steps * strength) steps: at least one."""
    if int(steps * strength) < 1:
        raise OptionError("strength", strength, text=f"{{option}}={strength} with {steps} steps leaves no step to "
                          f"run (int(steps * strength) = 0): raise either")


def check_clip_skip(clip_skip: int | None, text_encoder: Any) -> None:
    """clip_skip (checked >= 0 by check_call_options) below the text encoder's layer count, once it is loaded (SDXL's
    holds two encoders: the smaller bounds it)."""
    if clip_skip is not None:
        layers = min(e.num_layers for e in getattr(text_encoder, "encoders", [text_encoder]))
        check_int("clip_skip", clip_skip, 0, layers - 1, note=f" (this text encoder has {layers} layers)")


def check_eta(sampler: str, eta: float | None) -> None:
    """eta is an option of some samplers only: refused for the others."""
    if eta is not None and not SAMPLERS[sampler].accepts("eta"):
        raise OptionError("eta", eta, text=f"{{option}}={eta!r} was given, but sampler {sampler!r} has no eta; samplers "
                          f"that accept eta: {samplers_with_option('eta')}")


def check_device(device: torch.device | str | None) -> torch.device | None:
    """A torch.device this machine has (None stays None): an unknown name, or CUDA / MPS where torch sees none, is
    refused by name."""
    if device is None:
        return None
    valid = "a device of this machine (cpu, cuda, cuda:1, mps)"
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise OptionError("device", device, valid) from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError("device", str(device), valid, "torch sees no CUDA device here (torch.cuda.is_available() "
                              "is False): use 'cpu', or a machine and torch build with CUDA")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise OptionError("device", str(device), valid, f"this machine has {torch.cuda.device_count()} CUDA "
                              "device(s)")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError("device", str(device), valid, "MPS is not available on this machine")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise OptionError("device", str(device), valid)
    return d


def check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype the networks run in: float32, float16, bfloat16 or float64 (a torch.dtype or its name; None stays)."""
    if dtype is None:
        return None
    found = DTYPES.get(dtype) if isinstance(dtype, str) else dtype if dtype in DTYPES.values() else None
    if found is None:
        raise OptionError("dtype", dtype, "one of torch.float32, float16, bfloat16, float64")
    return found


# ------------------------------------------------------------------------------------------------------ lists


def _prompts(prompt: Any) -> tuple[str, ...]:
    if isinstance(prompt, str):
        return (prompt,)
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
        raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    if len(prompt) == 0:
        raise OptionError("prompt", [], text="{option} is an empty list: give at least one prompt")
    return tuple(prompt)


def _negatives(negative: Any, n: int) -> tuple[str, ...]:
    if negative is None:
        return ("",) * n
    if isinstance(negative, str):
        return (negative,) * n
    if not isinstance(negative, (list, tuple)) or not all(isinstance(p, str) for p in negative):
        raise TypeError(f"negative_prompt must be a string or a list of strings, got {type(negative).__name__}")
    if len(negative) != n:
        raise OptionError("negative_prompt", negative, text=f"{{option}}: got {len(negative)} negative prompts for "
                          f"{n} prompts (give one, or one per prompt)")
    return tuple(negative)


def _seed_option(seed: Any, n: int) -> int | tuple[int, ...] | None:
    """An int in [0, 2**64) or a list of n of them (ldm.random.check_seed names a bad one)."""
    if seed is None:
        return None
    if isinstance(seed, (list, tuple)):
        seeds = tuple(_seed(s, f"seed[{i}]") for i, s in enumerate(seed))
        if len(seeds) != n:
            raise OptionError("seed", seed, text=f"{{option}}: got {len(seeds)} seeds for {n} images (give one seed, "
                              "or one per image)")
        return seeds
    return _seed(seed, "seed")


def _seed(value: Any, name: str) -> int:
    try:
        return check_seed(value, name)
    except ValueError as e:
        raise OptionError(name, value, "an integer in [0, 2**64)") from e
