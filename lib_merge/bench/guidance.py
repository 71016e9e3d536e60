"""Guidance benchmark on the tiny U-Net: ``python -m lib_merge bench guidance [--sizes 32x32,48x32]``.

For each latent size it prints the U-Net rows and forwards per step and the best time per
step of CFG, CFG+PAG, CFG+PAG+SEG, untitled+PAG, CFG+NAG and untitled+NAG, batched (one forward)
and unbatched (one forward per pass). Then the per-step overhead of each alternative combiner
(APG, CFG-Zero*, TCFG, MaHiRo, Skimmed CFG, FDG) and of the CFG interval over plain CFG's combine. Then the cost of CFG++, CFG rescale, dynamic thresholding and FreeU relative
to a plain-CFG step, measured directly: the extra work timed on its own over many repeats, and
FreeU's hooks timed inside real forwards. On a shared CPU the step-to-step noise is larger than
a 2 % effect; FreeU is also shown as an interleaved A/B of whole forwards.

Every time is the best of its repeats, as ``timeit`` advises: the minimum is the run least
disturbed by other load. With one thread (the default) the clock is this process's CPU time,
which equals wall time on an idle machine but does not count the time other processes hold the
core; with more threads it is wall time.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import torch

from ..testing import EpsDenoiser, karras_sigmas, make_tiny_unet, random_conditioning
from ..untitled import zero_like_conditioning
from ..guidance.cfgpp import CfgppState, sample_euler_cfgpp
from ..guidance.hooks import install_freeu
from ..guidance.runner import GuidedDenoiser
from ..guidance.settings import GuidanceSettings
from ..guidance.stack import GuidanceStack

CASES = {
    "CFG": ({}, 7.0, False),
    "CFG+PAG": ({"pag_scale": 3.0}, 7.0, False),
    "CFG+PAG+SEG": ({"pag_scale": 3.0, "seg_scale": 3.0, "seg_sigma": math.inf}, 7.0, False),
    "untitled+PAG": ({"untitled": "zero", "pag_scale": 3.0}, 1.0, True),
    "CFG+NAG": ({"nag_scale": 4.0}, 7.0, False),
    # NAG needs a non-zero cond (zero conditioning has zero keys/values), so untitled "empty".
    "untitled+NAG": ({"untitled": "empty", "nag_scale": 4.0}, 1.0, True),
}
COMBINER_CASES = {
    "APG": {"apg_enabled": True},
    "CFG-Zero*": {"cfgzero_enabled": True},
    "TCFG": {"tcfg_enabled": True},
    "MaHiRo": {"mahiro_enabled": True},
    "Skimmed CFG": {"skimmed_enabled": True},
    "FDG": {"fdg_enabled": True},
    "CFG interval": {"cfg_interval": True, "cfg_interval_high": 100.0},
}
TARGETS = {"CFG++": 2.0, "rescale": 2.0, "dynthres": 2.0, "FreeU": 5.0}
_clock = time.perf_counter


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = _clock()
        fn()
        times.append(_clock() - start)
    return min(times)


def _step_times(unet, settings, cfg_scale, same_cond, batched, x, steps, cond, uncond, negative=None):
    stack = GuidanceStack(settings, steps, cfg_scale=cfg_scale, untitled_same_cond=same_cond)
    sigmas = karras_sigmas(steps, 0.03, 14.6)
    times = []
    with GuidedDenoiser(EpsDenoiser(unet), stack, diffusion_model=unet, cond=cond, uncond=uncond, batched=batched,
                        nag_negative=negative) as d:
        for i in range(steps):
            start = _clock()
            d(x, sigmas[i])
            times.append(_clock() - start)
        rows, forwards = d.rows_per_step[0], d.forwards_per_step[0]
    # The first call warms caches and allocators; it is not a representative step.
    return min(times[1:] if len(times) > 1 else times), rows, forwards


def _combine_cost(settings: GuidanceSettings, shape, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    c, u, x = (torch.randn(*shape, generator=g) for _ in range(3))
    sigma = torch.full((shape[0],), 2.0)
    stack = GuidanceStack(settings, 20, cfg_scale=7.0)
    plan = stack.plan(3, sigma=2.0)
    # The proof of effect runs on a pass's first step only; time the steady state.
    stack.effects.finish()
    return _best_time(lambda: stack.combine(plan, 3, x=x, sigma=sigma, d_cond=c, d_uncond=u), repeats)


def _sampler_update_cost(shape, repeats: int) -> float:
    """Per-step cost of the CFG++ Euler update over plain Euler, with a model that does no work."""
    g = torch.Generator().manual_seed(1)
    d_u, d_l = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    sigmas = karras_sigmas(50, 0.03, 14.6)

    class Model:
        cfgpp_state = CfgppState()

        def __call__(self, x, sigma):
            self.cfgpp_state.record(d_u)
            return d_l

    model, x0 = Model(), torch.randn(*shape, generator=g)

    def plain():
        x = x0
        for i in range(len(sigmas) - 1):
            d = model(x, sigmas[i] * x.new_ones(x.shape[0]))
            x = d + (sigmas[i + 1] / sigmas[i]) * (x - d)

    cfgpp = _best_time(lambda: sample_euler_cfgpp(model, x0, sigmas), repeats)
    return max(cfgpp - _best_time(plain, repeats), 0.0) / (len(sigmas) - 1)


def _freeu_costs(unet, x, cond, repeats: int):
    """(time inside the FreeU hooks per forward, A/B forward times with FreeU on and off), best of N."""
    settings = GuidanceSettings(freeu_enabled=True, freeu_version=2)
    t = torch.full((x.shape[0],), 500.0)
    enabled = [True]
    handle = install_freeu(unet, settings, model_channels=unet.model_channels, active=lambda: enabled[0])
    # Timers around our pre-hooks, measuring them where they run: inside a real forward, cache state included.
    spent, started = [0.0], [0.0]

    def begin(_m, _a):
        started[0] = _clock()

    def end(_m, _a):
        spent[0] += _clock() - started[0]

    timers = [b.register_forward_pre_hook(begin, prepend=True) for b in unet.output_blocks]
    timers += [b.register_forward_pre_hook(end) for b in unet.output_blocks]
    inside, on, off = [], [], []
    with torch.no_grad():
        for _ in range(3 * repeats):
            for flag, sink in ((True, on), (False, off)):
                enabled[0] = flag
                spent[0] = 0.0
                start = _clock()
                unet(x, t, cond)
                sink.append(_clock() - start)
                if flag:
                    inside.append(spent[0])
    for timer in timers:
        timer.remove()
    handle.remove()
    return min(inside), min(on), min(off)


def run(sizes, steps: int, repeats: int, channels: int, batch: int) -> None:
    torch.manual_seed(0)
    unet = make_tiny_unet("sd1", model_channels=channels)
    cond = random_conditioning(unet.config, batch, seed=1)
    uncond = random_conditioning(unet.config, batch, seed=2)
    zero = zero_like_conditioning(cond)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"tiny SD1-layout U-Net: model_channels={channels}, {n_params / 1e6:.2f} M params, batch {batch}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), clock: {_clock.__name__}")
    for h, w in sizes:
        x = torch.randn(batch, 4, h, w)
        print(f"\n== latent {h}x{w} ==")
        print(f"{'case':<14} {'mode':<10} {'rows/step':>9} {'fwd/step':>8} {'ms/step':>9}  (best of {steps - 1} steps)")
        base_ms, batched_shape = None, {}
        for name, (kw, cfg_scale, same) in CASES.items():
            c, u = (zero, zero) if same else (cond, uncond)
            negative = None
            if "nag_scale" in kw and same:
                c, u, negative = cond, cond, uncond
            for batched in (True, False):
                sec, rows, fwd = _step_times(unet, GuidanceSettings(**kw), cfg_scale, same, batched, x, steps, c, u,
                                             negative)
                if batched:
                    batched_shape[name] = (rows // batch, fwd)
                    base_ms = sec * 1e3 if name == "CFG" else base_ms
                print(f"{name:<14} {'batched' if batched else 'separate':<10} {rows:>9} {fwd:>8} {sec * 1e3:>9.2f}")
        for name, want in (("untitled+PAG", (2, 1)), ("CFG+PAG+SEG", (4, 1)), ("untitled+NAG", (1, 1))):
            got = batched_shape[name]
            verdict = "ok" if got == want else "MISSED"
            print(f"target {name}: {want[0]} rows per image in {want[1]} forward per step -> "
                  f"{got[0]} rows in {got[1]} ({verdict})")

        shape = tuple(x.shape)
        overhead = {
            "CFG++": _sampler_update_cost(shape, repeats) * 1e3,
            "rescale": max(_combine_cost(GuidanceSettings(rescale_phi=0.7), shape, 200)
                           - _combine_cost(GuidanceSettings(), shape, 200), 0.0) * 1e3,
            "dynthres": max(_combine_cost(GuidanceSettings(dynthres_enabled=True), shape, 200)
                            - _combine_cost(GuidanceSettings(), shape, 200), 0.0) * 1e3,
        }
        inside, on, off = _freeu_costs(unet, torch.cat([x, x]), torch.cat([cond, uncond]), repeats)
        overhead["FreeU"] = inside * 1e3
        print(f"overhead vs a plain-CFG step of {base_ms:.2f} ms (direct cost of the extra work; FreeU: time in its hooks):")
        for name, ms in overhead.items():
            pct = 100 * ms / base_ms
            verdict = "ok" if pct <= TARGETS[name] else "OVER TARGET"
            print(f"  {name:<9} {ms:8.3f} ms  {pct:6.2f} %  (target <= {TARGETS[name]:.0f} %: {verdict})")
        print(f"  FreeU A/B forward (2 rows, interleaved, best of {3 * repeats}): on {on * 1e3:.2f} ms, off {off * 1e3:.2f} ms, "
              f"{100 * (on - off) / off:+.2f} %")
        plain = _combine_cost(GuidanceSettings(), shape, 200)
        print(f"combiner overhead per step over plain CFG's combine ({plain * 1e3:.3f} ms), vs the plain-CFG step:")
        for name, kw in COMBINER_CASES.items():
            ms = max(_combine_cost(GuidanceSettings(**kw), shape, 200) - plain, 0.0) * 1e3
            print(f"  {name:<12} {ms:8.3f} ms  {100 * ms / base_ms:6.2f} %")


def _parse_sizes(text: str):
    return [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",") if part.strip()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lib_merge bench guidance", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32x32,48x32,64x64", help="latent HxW list (default %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="sampler steps per measurement (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=7, help="repeats of each micro-measurement (default %(default)s)")
    parser.add_argument("--channels", type=int, default=32, help="model_channels of the U-Net (default %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="images per batch (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 keeps timings stable on a shared machine (default %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global _clock
    _clock = time.process_time if args.threads == 1 else time.perf_counter
    run(_parse_sizes(args.sizes), args.steps, args.repeats, args.channels, args.batch)


if __name__ == "__main__":
    main()
