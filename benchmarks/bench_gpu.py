"""Speed at paper shape on a GPU (tiny shape on a CPU, so `make bench` runs it anywhere). Prints JSON.

GPU (paper setting): DiT-XL/2, learned sigma, latents 4×32×32, batch 8, DiffFit on 14 blocks, 10 classes,
memories 64/64, bf16 autocast. CPU: the demo's tiny DiT, latents 4×8×8, batch 32, fp32.
- `finetune_step`: ms per training step (the project's TrainLoop: draw, losses, update, memory pushes) for
  memory policy none / fifo / adaptive, and for none with the stock diffusers conditioning (each block
  recomputing the timestep and label embedding, the path before it was shared) as the in-project comparison;
  what the memory adds = (adaptive − none) / none; on a GPU also adaptive with `compile: true` (mode default, and
  reduce-overhead = CUDA graphs), timed after the compiling warm-up steps;
- `flops`: forward + backward FLOPs of one step (torch.utils.flop_counter), the achieved FLOP/s and, on a
  known GPU, the share of its dense bf16 peak;
- `sampling`: DDPM-50 with CFG 4 (one doubled batch), images per second;
- `evaluation`: classifier training images per second (ConvNet-6 at 128 px and ResNet-18 at 224 px on a GPU;
  ConvNet-3 at 16 px on a CPU).
Goals (issue: GPU speed): fine-tune step <= 40 ms with adaptive memory, memory <= 3 % of a step, sampling
>= 20 images/s, ResNet-18 224 px training >= 8,000 images/s. Report ratios from one run on one machine.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffdistill.config import SampleConfig, build_config
from diffdistill.diffusion import NoiseSchedule
from diffdistill.models.adapters import make_trainable
from diffdistill.models.dit import build_dit
from diffdistill.runtime import package_versions, setup
from diffdistill.stages.evaluate import train_classifier
from diffdistill.stages.sample import sample_latents
from diffdistill.stages.train import TrainLoop

BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s of the SXM parts


class RandomLatents:
    """A latent source of random latents with balanced labels (the loop reads only these members)."""

    def __init__(self, n: int, classes: int, shape: tuple[int, int, int]) -> None:
        self.labels, self.classes, self.shape = torch.arange(n) % classes, [str(c) for c in range(classes)], shape

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self) -> dict:
        return {}

    def sample(self, idx, generator, device, noise_generator=None, upcoming=None):
        g = noise_generator or generator  # drawn on the device, as the loop draws its noise
        return torch.randn((len(idx), *self.shape), generator=g, device=g.device).to(device)


def synced(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def step_ms(setting: dict, policy: str, stock_embedding: bool, device: torch.device, out: str,
            compile_mode: str | None = None, profile: str | None = None,
            autocast_casts: bool = False) -> tuple[float, float]:
    """ms per TrainLoop step after warm-up, and the loop's own memory timer (CUDA events on a GPU) as a share of
    the timed steps' wall time, in %."""
    shape = setting["latent"]
    compiling = [] if compile_mode is None else ["compile=true", f"compile_mode={compile_mode}"]
    cfg = build_config({}, [f"out_dir={out}", "name=bench", f"precision={setting['precision']}",
                            f"finetune.batch_size={setting['batch']}", f"finetune.memory.policy={policy}",
                            f"finetune.trainable={setting['trainable']}", "finetune.memory.size_real=64",
                            "finetune.memory.size_gen=64", "finetune.log_every=1000000", *compiling])
    torch.manual_seed(0)
    with device:  # initialised where it runs: a DiT-XL/2 takes seconds to initialise on the host
        model = build_dit(setting["size"], shape[0], shape[1], 1000, learn_sigma=setting["learn_sigma"]).to(device)
    if stock_embedding:  # the plain diffusers embedder class: recomputed by every block
        emb = model.transformer_blocks[0].norm1.emb
        emb.__class__ = emb.__class__.__mro__[1]
    trainable = make_trainable(model, setting["trainable"], 14 if setting["trainable"] == "difffit" else None)
    source = RandomLatents(64 * 10, 10, shape)
    loop = TrainLoop(cfg, "finetune", model.train(), trainable, source, shape, torch.arange(10), device)
    if autocast_casts:  # autocast casts every matrix weight in every forward (the path before CastOnce)
        loop.net = model
    sync = synced(device)
    for loop.step in range(1, setting["warmup"] + 1):
        loop.train_step()
    sync()
    memory0 = loop.mem_timer.seconds()
    t0 = time.perf_counter()
    for loop.step in range(setting["warmup"] + 1, setting["warmup"] + setting["steps"] + 1):
        loop.train_step()
    sync()
    seconds = time.perf_counter() - t0
    share = 100 * (loop.mem_timer.seconds() - memory0) / seconds
    if profile:  # where a step's time goes: operators by host time and by device time, over 5 more steps
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profiler(activities=activities) as prof:
            first = loop.step + 1
            for loop.step in range(first, first + 5):
                loop.train_step()
            sync()
        table = prof.key_averages()
        by_device = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        Path(profile).write_text(table.table(sort_by="self_cpu_time_total", row_limit=30) + "\n\n"
                                 + table.table(sort_by=by_device, row_limit=30))
    return 1000 * seconds / setting["steps"], share


def flops(setting: dict, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    shape, b = setting["latent"], setting["batch"]
    with device:
        model = build_dit(setting["size"], shape[0], shape[1], 1000, learn_sigma=setting["learn_sigma"]).to(device)
    make_trainable(model, setting["trainable"], 14 if setting["trainable"] == "difffit" else None)  # as timed
    x, t, y = torch.randn(b, *shape, device=device), torch.randint(0, 1000, (b,), device=device), \
        torch.randint(0, 1000, (b,), device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=setting["precision"] == "bf16"):
            out = model(x, t, y).sample
        out.float().square().mean().backward()
    return float(counter.get_total_flops())


def sampling_images_per_s(setting: dict, device: torch.device, compile_model: bool = False) -> float:
    shape, n = setting["latent"], setting["sample_images"]
    with device:
        model = build_dit(setting["size"], shape[0], shape[1], 1000, learn_sigma=setting["learn_sigma"]).to(device)
    model.eval()
    if compile_model:  # as `compile: true` does in the sample stage; the warm-up below compiles it
        model = torch.compile(model)
    scfg = SampleConfig(scheduler="ddpm", steps=setting["sample_steps"], guidance=4.0, batch_size=n)
    betas = NoiseSchedule.from_config(build_config({}, []).diffusion).betas
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    labels = torch.arange(n) % 10
    sync = synced(device)
    warm = n if compile_model else 2  # a compiled model warms up at the timed batch shape (no recompiling)
    sample_latents(model, scfg, betas, labels[:warm], gens[:warm], shape, device, setting["precision"])
    sync()
    t0 = time.perf_counter()
    sample_latents(model, scfg, betas, labels, gens, shape, device, setting["precision"])
    sync()
    return n / (time.perf_counter() - t0)


def evaluation_images_per_s(net: str, size: int, channels: int, images: int, device: torch.device,
                            precision: str = "fp32") -> float:
    ecfg = build_config({}, ["evaluate.batch_size=128", "evaluate.eval_every=1000",
                             f"evaluate.precision={precision}"]).evaluate
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (images, channels, size, size), generator=g, dtype=torch.uint8).to(device)
    y = (torch.arange(images) % 10).to(device)
    norm = (torch.full((1, channels, 1, 1), 0.5, device=device), torch.full((1, channels, 1, 1), 0.25, device=device))
    train_classifier(net, x[:256], y[:256], x[:64], y[:64], norm, 10, 1, 0, ecfg, True)  # warm-up
    sync = synced(device)
    sync()
    t0 = time.perf_counter()
    train_classifier(net, x, y, x[:64], y[:64], norm, 10, 2, 0, ecfg, True)
    sync()
    return 2 * images / (time.perf_counter() - t0)


def matmul_per_s(device: torch.device) -> float:
    """The device's bf16 matrix rate on random data (8192³, mean of 10 after 3 warm-ups): the measured ceiling."""
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t0)


def vae_decode_images_per_s(device: torch.device, n: int = 64) -> float:
    """Decoding latents 4×32×32 to 256 px images with the Stable-Diffusion VAE's architecture (random weights,
    bf16 autocast): the other half of the `sample` stage at paper scale."""
    from diffusers import AutoencoderKL

    with device:
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            sample_size=256).to(device).eval()
    z = torch.randn(n, 4, 32, 32, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        vae.decode(z[:8])  # warm-up
        synced(device)()
        t0 = time.perf_counter()
        for chunk in z.split(32):
            vae.decode(chunk)
        synced(device)()
    return n / (time.perf_counter() - t0)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the JSON here, after every section (a cut-off run keeps them)")
    parser.add_argument("--profile", help="write a profile of 5 adaptive steps here (operator tables)")
    parser.add_argument("--skip", default="", help="sections to leave out, comma-separated: step,compile,flops,"
                        "sampling,vae,evaluation")
    args = parser.parse_args()
    skip = set(args.skip.split(",")) - {""}
    gpu = torch.cuda.is_available()
    device = setup(build_config({}, ["threads=2"] if not gpu else []))
    setting = dict(size="DiT-XL/2", latent=(4, 32, 32), batch=8, learn_sigma=True, trainable="difffit",
                   precision="bf16", warmup=10, steps=30, sample_images=128, sample_steps=50) if gpu else \
        dict(size="tiny", latent=(4, 8, 8), batch=32, learn_sigma=False, trainable="full", precision="fp32",
             warmup=3, steps=20, sample_images=20, sample_steps=10)
    name = torch.cuda.get_device_name() if gpu else "cpu"
    result: dict = {"benchmark": "gpu" if gpu else "gpu (tiny shape on the CPU)", "device": name,
                    "setting": {k: list(v) if isinstance(v, tuple) else v for k, v in setting.items()},
                    "versions": package_versions()}

    def section(key: str, fn) -> None:
        """Run one section; its error is recorded rather than losing the sections after it."""
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a benchmark reports what failed and goes on
            result.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"[:500]
        result.setdefault("section_seconds", {})[key] = round(time.perf_counter() - t0, 1)
        print(f"# {key}: {result['section_seconds'][key]} s", file=sys.stderr, flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))

    steps: dict[str, float] = {}
    shares: dict[str, float] = {}
    tmp = tempfile.TemporaryDirectory()

    def run_steps() -> None:
        for p in ("none", "fifo", "adaptive"):
            steps[p], shares[p] = step_ms(setting, p, False, device, tmp.name,
                                          profile=args.profile if p == "adaptive" else None)
        steps["none, stock diffusers conditioning"], _ = step_ms(setting, "none", True, device, tmp.name)
        if setting["precision"] != "fp32":
            steps["none, autocast casting the weights"], _ = step_ms(setting, "none", False, device, tmp.name,
                                                                     autocast_casts=True)
        result["finetune_step_ms"] = {k: round(v, 2) for k, v in steps.items()}
        # what the adaptive memory adds to a step: (adaptive − none) / none
        result["memory_adds_percent"] = round(100 * (steps["adaptive"] - steps["none"]) / steps["none"], 2)
        result["memory_timer_share_percent"] = {k: round(v, 2) for k, v in shares.items()}

    def run_compile() -> None:
        for mode in ("default", "reduce-overhead"):  # compiling takes minutes on a small CPU, for nothing to learn
            key = f"adaptive, compile {mode}"
            try:
                profile = f"{args.profile}.{mode}" if args.profile else None
                steps[key], shares[key] = step_ms(setting, "adaptive", False, device, tmp.name, mode, profile)
            except Exception as e:  # noqa: BLE001
                result.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"[:500]
            result["finetune_step_ms"] = {k: round(v, 2) for k, v in steps.items()}
            result["memory_timer_share_percent"] = {k: round(v, 2) for k, v in shares.items()}

    def run_flops() -> None:
        f = flops(setting, device)
        achieved = f / (steps["none"] / 1000) if "none" in steps else None
        peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
        measured = matmul_per_s(device) if gpu else None
        result["flops"] = {"per_step_forward_backward": f, "achieved_per_s": achieved,
                           "share_of_bf16_peak": round(achieved / peak, 4) if peak and achieved else None,
                           "measured_bf16_matmul_per_s": measured,
                           "share_of_measured_matmul": round(achieved / measured, 4) if measured and achieved
                           else None}

    def run_sampling() -> None:
        result["sampling_images_per_s"] = round(sampling_images_per_s(setting, device), 2)
        if gpu:
            result["sampling_images_per_s_compiled"] = round(sampling_images_per_s(setting, device, True), 2)

    def run_vae() -> None:
        result["vae_decode_images_per_s"] = round(vae_decode_images_per_s(device), 2)

    def run_evaluation() -> None:
        evals = [("convnet6", 128, 3, 4096, "fp32"), ("resnet18", 224, 3, 4096, "fp32"),
                 ("resnet18", 224, 3, 4096, "bf16")] if gpu else [("convnet3", 16, 1, 256, "fp32")]
        result["evaluation_images_per_s"] = {}
        for net, size, c, n, precision in evals:
            result["evaluation_images_per_s"][f"{net} {size} px {precision}"] = round(
                evaluation_images_per_s(net, size, c, n, device, precision), 1)

    sections = {"step": run_steps, "compile": run_compile, "flops": run_flops, "sampling": run_sampling,
                "vae": run_vae, "evaluation": run_evaluation}
    for key, fn in sections.items():
        if key in skip or (key in ("compile", "vae") and not gpu):
            continue
        section(key, fn)
    tmp.cleanup()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
