"""The same training step in JAX (resnet_jax) and PyTorch, measured in one run.

    python -m benchmarks.compare_torch --model resnet20 --batch-size 128
    python -m benchmarks.compare_torch --model resnet50 --batch-size 128 --dtype bfloat16

PyTorch side: torchvision's ResNet for ImageNet nets (a CIFAR ResNet with
option-A shortcuts, written below to match resnet_jax, for resnetN), in
channels-last memory format, SGD momentum 0.9 + weight decay 1e-4,
cross-entropy, ``torch.autocast`` for bfloat16, ``torch.compile`` unless
``--no-compile`` or it fails (then eager, and the output says so). Both sides
run a synthetic batch resident on the device; JAX is measured first, by
``benchmarks.throughput`` in a child process, then PyTorch in this one.
Prints a table, the ratio JAX / PyTorch, and, last, one JSON object.

PyTorch is an optional dependency of the benchmarks only:
``pip install torch`` (and ``torchvision`` for the ImageNet nets).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

from benchmarks import throughput

TORCH_MISSING = (
    "PyTorch is not installed: pip install torch torchvision (an optional dependency "
    "of the benchmarks only)."
)


def torch_cifar_resnet(depth: int, num_classes: int = 10):
    """The paper's CIFAR ResNet (option A), the torch counterpart of rj's resnetN."""
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.stride, self.pad = stride, cout - cin

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            s = x[:, :, :: self.stride, :: self.stride]
            if self.pad:
                s = F.pad(s, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            return F.relu(y + s)

    n = (depth - 2) // 6
    layers, cin = [], 16
    for i, w in enumerate((16, 32, 64)):
        for j in range(n):
            layers.append(Block(cin, w, 2 if i > 0 and j == 0 else 1))
            cin = w
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def measure_torch(
    model: str,
    batch_size: int,
    dtype: str,
    steps: int,
    warmup: int,
    compile_: bool,
    image_size: int | None,
) -> dict:
    try:
        import torch
    except ImportError as e:
        raise SystemExit(TORCH_MISSING) from e
    import resnet_jax as rj

    spec = rj.model_spec(model)
    if spec["family"] == "cifar":
        net = torch_cifar_resnet(int(model.replace("cifar_", "").replace("resnet", "")))
        size, classes = image_size or 32, 10
    else:
        try:
            import torchvision
        except ImportError as e:
            raise SystemExit(
                "torchvision is needed for ImageNet nets: pip install torchvision"
            ) from e
        net = getattr(torchvision.models, model)()
        size, classes = image_size or 224, 1000
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = net.to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch_size, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch_size,), device=device)
    amp = dtype == "bfloat16"

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss

    compiled, note = False, ""
    fn = step
    t0 = time.perf_counter()
    if compile_:
        try:
            fn = torch.compile(step)
            fn(x, y)
            compiled = True
        except Exception as e:  # noqa: BLE001 - report and fall back to eager
            note = f"torch.compile failed ({type(e).__name__}); eager"
            fn = step
    fn(x, y)
    compile_s = time.perf_counter() - t0

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn(x, y)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn(x, y)
    sync()
    dt = time.perf_counter() - t0
    return {
        "torch": torch.__version__,
        "torch_device": device,
        "torch_compile": compiled,
        "torch_note": note,
        "torch_threads": torch.get_num_threads(),
        "torch_images_per_sec": batch_size * steps / dt,
        "torch_step_ms": 1000 * dt / steps,
        "torch_compile_seconds": compile_s,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--no-compile", action="store_true", help="PyTorch eager only")
    throughput.add_materialize_flag(p)
    p.add_argument(
        "--compilation-cache-dir",
        default=os.path.expanduser("~/.cache/resnet_jax/jax_compilation_cache"),
    )
    throughput.add_cpu_flags(p)
    a = p.parse_args(argv)
    if importlib.util.find_spec("torch") is None:
        raise SystemExit(TORCH_MISSING)
    jax_argv = [
        sys.executable,
        "-m",
        "benchmarks.throughput",
        f"--model={a.model}",
        f"--batch-size={a.batch_size}",
        f"--dtype={a.dtype}",
        f"--steps={a.steps}",
        f"--warmup={a.warmup}",
        f"--materialize={a.materialize}",
        f"--compilation-cache-dir={a.compilation_cache_dir}",
        f"--cpu-devices={a.cpu_devices}",
        f"--cpu-conv={a.cpu_conv}",
    ]
    if a.image_size:
        jax_argv.append(f"--image-size={a.image_size}")
    # JAX runs in a child process that has exited before PyTorch starts, so
    # neither side's thread pools compete with the other's measurement.
    child = subprocess.run(jax_argv, capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(f"The JAX measurement failed:\n{child.stdout}{child.stderr}")
    jx = json.loads(child.stdout.strip().splitlines()[-1])
    pt = measure_torch(
        a.model, a.batch_size, a.dtype, a.steps, a.warmup, not a.no_compile, a.image_size
    )
    r = {**jx, **pt, "ratio_jax_over_torch": jx["images_per_sec"] / pt["torch_images_per_sec"]}
    kind = "torch.compile" if pt["torch_compile"] else "eager"
    print(
        f"{a.model} train step, batch {a.batch_size}, {a.dtype}, {jx['device_kind']}, "
        f"{jx['devices']} JAX device(s)"
    )
    print(
        f"  JAX (resnet_jax)   {jx['images_per_sec']:9.1f} images/s  ({jx['step_ms']:.1f} ms/step)"
    )
    print(
        f"  PyTorch ({kind:13}) {pt['torch_images_per_sec']:9.1f} images/s  "
        f"({pt['torch_step_ms']:.1f} ms/step) {pt['torch_note']}"
    )
    print(f"  ratio JAX/PyTorch  {r['ratio_jax_over_torch']:.2f}")
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
