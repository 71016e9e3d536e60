"""``python -m lib_merge bench live``: how fast the live merge patches a loaded U-Net.

For the tiny ldm U-Net and a full-size SD1.5 U-Net built on the CPU it measures the live patch of
one block and of all blocks against (a) the memory-bandwidth floor of the bytes a patch must move
(read A's and B's tensors, write the merged ones: 3 × the block's bytes at the machine's measured
copy bandwidth) and (b) reloading the full checkpoint from disk (read the file with its pages
dropped from the page cache, then ``load_state_dict``), plus the same reload from a warm cache.
Targets: one block ≤ 3× its floor; all blocks ≥ 20× faster than a reload.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ..arch import block_of, full_layout
from ..io.writer import SafetensorsWriter
from ..live import LiveMerge, LiveTarget
from ..recipe import Recipe
from ..synthetic import synthetic_tensor
from ..testing import UNetModel, make_tiny_unet, sd1_config

PREFIX = "model.diffusion_model."


def _tiny(seed: int) -> torch.nn.Module:
    return make_tiny_unet("sd1", seed, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_resolutions=(1, 2, 4),
                          transformer_depth=(1, 1, 1, 0))


def _write(path: Path, unet_state: dict, seed: int, text_divisor: int) -> None:
    """A single-file SD1 checkpoint: the U-Net's tensors, plus text encoder and VAE with real names."""
    planned = [(PREFIX + k, tuple(v.shape), torch.float16) for k, v in unet_state.items()]
    extra = {k: v for k, v in full_layout("sd1", width_divisor=text_divisor).items() if not k.startswith(PREFIX)}
    planned += [(k, shape, torch.int64 if kind == "int" else torch.float16) for k, (shape, kind) in extra.items()]
    writer = SafetensorsWriter(path, planned, {}, overwrite=True, durable=False)
    try:
        for k, v in unet_state.items():
            writer.write(PREFIX + k, v.detach().to(torch.float16).contiguous())
        for k, (shape, kind) in extra.items():
            t = synthetic_tensor(k, shape, kind, family=seed, model=seed, spread=0.1)
            writer.write(k, t if kind == "int" else t.to(torch.float16))
        writer.finish()
    except BaseException:
        writer.abort()
        raise


def _make_files(size: str, folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    a, b = folder / f"live_{size}_a.safetensors", folder / f"live_{size}_b.safetensors"
    for seed, path in ((0, a), (1, b)):
        if path.exists():
            continue
        if size == "tiny":
            _write(path, _tiny(seed).state_dict(), seed, text_divisor=64)
        else:
            torch.manual_seed(seed)
            with torch.no_grad():
                unet = UNetModel(sd1_config()).to(torch.float16)
            _write(path, unet.state_dict(), seed, text_divisor=1)
            del unet
    return a, b


def _clock() -> float:
    """perf_counter after the GPU finished what was queued (copies to a CUDA model are async)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def _drop_cache(path: Path) -> bool:
    """Evict the file's pages from the page cache (no root needed); False where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def _reload(module: torch.nn.Module, path: Path) -> float:
    """What a WebUI does on a checkpoint change, minus model construction: read the file, copy the
    U-Net tensors into the loaded module (on its device)."""
    from safetensors.torch import load_file

    started = _clock()
    state = load_file(str(path))
    module.load_state_dict({k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)})
    del state
    return _clock() - started


def h2d_bandwidth(device: str, nbytes: int = 1 << 30, repeat: int = 5) -> float:
    """Host-to-device copy bandwidth from ordinary (pageable) memory, as the live merge copies."""
    src = torch.empty(nbytes // 2, dtype=torch.float16).fill_(1)
    dst = torch.empty_like(src, device=device)
    best = float("inf")
    for _ in range(repeat):
        t = _clock()
        dst.copy_(src)
        best = min(best, _clock() - t)
    return nbytes / best


def bandwidth(nbytes: int = 1 << 30, repeat: int = 5) -> float:
    """Copy bandwidth in bytes moved (read + write) per second, best of ``repeat``."""
    src = torch.empty(nbytes // 2, dtype=torch.float16).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def _block_bytes(module: torch.nn.Module) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for k, v in module.state_dict().items():
        block = block_of("sd1", PREFIX + k)
        sizes[block] = sizes.get(block, 0) + v.numel() * v.element_size()
    return sizes


def _patch_times(target: LiveTarget, a: Path, b: Path, block: str, n_blocks: int, *, threads: int | None,
                 repeat: int) -> tuple[float, float, float, float]:
    """(first apply of all blocks, all blocks, one block, restore of all blocks), medians in seconds."""
    live = LiveMerge(target, a, threads=threads)
    models = (str(a), str(b))
    t = _clock()
    live.apply(Recipe("weighted_sum", models, alpha=0.5))
    first_all = _clock() - t
    all_times = []
    for i in range(repeat):
        t = _clock()
        report = live.apply(Recipe("weighted_sum", models, alpha=0.3 + 0.1 * (i % 4)))
        all_times.append(_clock() - t)
        assert len(report.blocks) == n_blocks  # every U-Net block
    live.apply(Recipe("weighted_sum", models, alpha=0.5))
    one_times = []
    for i in range(repeat * 2):
        weights = f"{block}={0.1 + 0.8 * ((i % 5) / 5):.2f}"
        t = _clock()
        report = live.apply(Recipe("weighted_sum", models, alpha=0.5, weights=weights))
        one_times.append(_clock() - t)
        assert report.blocks == [block]
    t = _clock()
    live.restore()
    restore_all = _clock() - t
    live.close()
    return first_all, statistics.median(all_times), statistics.median(one_times), restore_all


def run(size: str, folder: Path, *, threads: int | None, repeat: int, bw: float, device: str = "cpu") -> dict:
    a, b = _make_files(size, folder)
    module = (_tiny(0) if size == "tiny" else UNetModel(sd1_config())).to(torch.float16).to(device).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    _warm(a)
    _reload(module, a)
    sizes = _block_bytes(module)
    total = sum(sizes.values())
    reload_warm = min(_reload(module, a) for _ in range(2))
    cold = []
    for _ in range(2):
        if not _drop_cache(a):
            break
        cold.append(_reload(module, a))
    reload_cold = min(cold) if cold else None
    _warm(a)
    _warm(b)

    block = "IN04"  # a mid-sized block: a ResBlock and a transformer at 640 channels
    first_all, all_blocks, one, restore_all = _patch_times(LiveTarget({PREFIX: module}), a, b, block, len(sizes),
                                                          threads=threads, repeat=repeat)
    # The A1111 adapter's path: merged values go through a scratch buffer and
    # ``load_state_dict(strict=False)`` per module (one more copy, so the LoRA built-in stays consistent).
    from ..webui.board.host_a1111 import A1111Target

    host_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=module))
    _, host_all, host_one, _ = _patch_times(A1111Target(host_model), a, b, block, len(sizes),
                                            threads=threads, repeat=repeat)
    # Floor: read A and B, write the merge, at the CPU's copy bandwidth; on a GPU the merge must
    # also cross to the device, which can overlap the CPU work, so the slower of the two bounds it.
    h2d = h2d_bandwidth(device) if device != "cpu" else None
    floor_one = max(3 * sizes[block] / bw, sizes[block] / h2d if h2d else 0.0)
    floor_all = max(3 * total / bw, total / h2d if h2d else 0.0)
    return {
        "size": size,
        "unet_params_M": round(total / 2 / 1e6, 1),
        "unet_bytes_MB": round(total / 2**20, 1),
        "block": block,
        "block_MB": round(sizes[block] / 2**20, 2),
        "threads": threads or 1,
        "device": device,
        "h2d_GBps": round(h2d / 1e9, 2) if h2d else None,
        "bandwidth_GBps": round(bw / 1e9, 2),
        "one_block_s": round(one, 5),
        "one_block_floor_s": round(floor_one, 5),
        "one_block_x_floor": round(one / floor_one, 2),
        "all_blocks_s": round(all_blocks, 4),
        "all_blocks_first_s": round(first_all, 4),
        "all_blocks_floor_s": round(floor_all, 4),
        "restore_all_s": round(restore_all, 4),
        "a1111_one_block_s": round(host_one, 5),
        "a1111_one_block_x_floor": round(host_one / floor_one, 2),
        "a1111_all_blocks_s": round(host_all, 4),
        "reload_from_disk_s": round(reload_cold, 4) if reload_cold is not None else None,
        "reload_warm_cache_s": round(reload_warm, 4),
        "reload_over_all_blocks": round(reload_cold / all_blocks, 1) if reload_cold is not None else None,
        "warm_reload_over_all_blocks": round(reload_warm / all_blocks, 1),
        "reload_over_a1111_all_blocks": round(reload_cold / host_all, 1) if reload_cold is not None else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_merge bench live", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "sd15", "both"), default="both")
    parser.add_argument("--dir", type=Path, default=Path("bench_tmp"), help="scratch folder (~4.5 GB for sd15)")
    parser.add_argument("--threads", type=int, help="live-merge worker threads (default 1: torch splits each kernel over its own threads)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="where the U-Net lives, e.g. cuda (A's originals stay on the CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per size")
    args = parser.parse_args(argv)
    bw = bandwidth()
    sizes = ("tiny", "sd15") if args.size == "both" else (args.size,)
    for size in sizes:
        result = run(size, args.dir, threads=args.threads, repeat=args.repeat, bw=bw, device=args.device)
        if args.json:
            print(json.dumps(result), flush=True)
            continue
        print(f"\n{size}: U-Net {result['unet_params_M']} M params ({result['unet_bytes_MB']} MB fp16) on "
              f"{result['device']}, {result['threads']} thread(s), torch {torch.get_num_threads()} intra-op threads, "
              f"copy bandwidth {result['bandwidth_GBps']} GB/s"
              + (f", host-to-device {result['h2d_GBps']} GB/s" if result["h2d_GBps"] else ""))
        print(f"  one block ({result['block']}, {result['block_MB']} MB): {result['one_block_s'] * 1000:.1f} ms; "
              f"floor {result['one_block_floor_s'] * 1000:.1f} ms -> {result['one_block_x_floor']}x the floor")
        print(f"  all blocks: {result['all_blocks_s'] * 1000:.0f} ms (first apply, capturing A: "
              f"{result['all_blocks_first_s'] * 1000:.0f} ms; floor {result['all_blocks_floor_s'] * 1000:.0f} ms); "
              f"restore {result['restore_all_s'] * 1000:.0f} ms")
        print(f"  A1111 write path (scratch + load_state_dict per module): one block "
              f"{result['a1111_one_block_s'] * 1000:.1f} ms ({result['a1111_one_block_x_floor']}x the floor), "
              f"all blocks {result['a1111_all_blocks_s'] * 1000:.0f} ms")
        cold = result["reload_from_disk_s"]
        print(f"  reload: from disk {cold * 1000:.0f} ms ({result['reload_over_all_blocks']}x all blocks; "
              f"{result['reload_over_a1111_all_blocks']}x the A1111 path)"
              if cold is not None else "  reload from disk: page cache cannot be dropped here")
        print(f"          warm page cache {result['reload_warm_cache_s'] * 1000:.0f} ms "
              f"({result['warm_reload_over_all_blocks']}x all blocks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
