"""The same training step in JAX (resnet_jax) and PyTorch, measured in one run.

    python -m benchmarks.compare_torch --model resnet20 --batch-size 128 --repeats 5
    python -m benchmarks.compare_torch --model resnet50 --batch-size 128 --dtype bfloat16

PyTorch side: torchvision's ResNet for ImageNet nets (a CIFAR ResNet with
option-A shortcuts, written below to match resnet_jax, for resnetN), in
channels-last memory format, SGD momentum 0.9 + weight decay 1e-4,
cross-entropy, ``torch.autocast`` for bfloat16, ``torch.compile`` unless
``--no-compile`` or it fails (then eager, and the result says so). Both sides
run a synthetic batch resident on the device. JAX is measured first, by
``benchmarks.throughput`` in a child process that has exited before PyTorch
starts in this one (so neither runtime's thread pools compete with the other's
measurement); each side runs ``--repeats`` timed runs of ``--steps`` steps.
Records both sides' repeats, medians and spreads, and the ratio of the medians
JAX / PyTorch.

PyTorch is an optional dependency of the benchmarks only:
``pip install torch`` (and ``torchvision`` for the ImageNet nets).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

from benchmarks import common

TORCH_MISSING = (
    "PyTorch is not installed: pip install torch torchvision (an optional dependency "
    "of the benchmarks only)."
)


def require_torch() -> None:
    """Exits with an install hint when PyTorch is missing."""
    if importlib.util.find_spec("torch") is None:
        raise SystemExit(TORCH_MISSING)


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


def torch_model(model: str, image_size: int | None):
    """``(torch module, image size, classes)``: the PyTorch counterpart of ``model``."""
    import resnet_jax as rj

    spec = rj.model_spec(model)
    if spec.family == "cifar":
        if not spec.residual:
            raise SystemExit(f"{model}: no PyTorch counterpart of the plain CIFAR nets here.")
        return torch_cifar_resnet(6 * spec.stage_sizes[0] + 2), image_size or 32, 10
    try:
        import torchvision
    except ImportError as e:
        raise SystemExit("torchvision is needed for ImageNet nets: pip install torchvision") from e
    return getattr(torchvision.models, model)(), image_size or 224, 1000


def _compiled_step(net, opt, device: str, amp: bool, compile_: bool, x, y):
    """The train step, compiled with ``torch.compile`` where it works:
    ``(step, compiled?, note, seconds to the first result)``."""
    import torch

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss

    fn, compiled, note = step, False, ""
    t0 = time.perf_counter()
    if compile_:
        try:
            fn = torch.compile(step)
            fn(x, y)
            compiled = True
        except Exception as e:  # noqa: BLE001 - report and fall back to eager
            fn, note = step, f"torch.compile failed ({type(e).__name__}); eager"
    fn(x, y)
    return fn, compiled, note, time.perf_counter() - t0


def measure_torch(a) -> dict:
    """PyTorch's side for the parsed flags ``a``: settings, repeats and figures."""
    require_torch()
    import torch

    net, size, classes = torch_model(a.model, a.image_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # autotuned kernels, as XLA autotunes its own
    net = net.to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(a.batch_size, 3, size, size, device=device)
    x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (a.batch_size,), device=device)
    fn, compiled, note, compile_s = _compiled_step(
        net, opt, device, a.dtype == "bfloat16", not a.no_compile, x, y
    )

    def run(n):
        for _ in range(n):
            fn(x, y)
        if device == "cuda":
            torch.cuda.synchronize()

    run(a.warmup)
    seconds = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        run(a.steps)
        seconds.append(time.perf_counter() - t0)
    return {
        "device": device,
        "device_kind": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "cudnn_benchmark": device == "cuda",
        "compile": compiled,
        "note": note,
        "threads": torch.get_num_threads(),
        "compile_seconds": compile_s,
        **common.repeat_figures(a.batch_size, a.steps, seconds),
    }


def jax_variant(model: str) -> str:
    """The resnet_jax variant that computes what the PyTorch side computes:
    torchvision's ImageNet nets are v1.5 (the same as v1 for basic blocks)."""
    import resnet_jax as rj

    return "v1.5" if rj.model_spec(model).family == "imagenet" else "v1"


def measure_jax(a) -> dict:
    """JAX's side: ``benchmarks.throughput`` in a child process; its result."""
    names = ("model", "batch_size", "dtype", "steps", "warmup", "repeats", "materialize")
    names += ("compilation_cache_dir", "cpu_devices", "cpu_conv")
    argv = [f"--{n.replace('_', '-')}={getattr(a, n)}" for n in names]
    # torchvision's bottleneck is v1.5 (stride in the 3x3): compare the same work.
    argv.append(f"--variant={jax_variant(a.model)}")
    if a.image_size:
        argv.append(f"--image-size={a.image_size}")
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", *argv, "--results="],
        capture_output=True,
        text=True,
        cwd=common.REPO,
    )
    if child.returncode:
        raise SystemExit(f"The JAX measurement failed:\n{child.stdout}{child.stderr}")
    return json.loads(child.stdout.strip().splitlines()[-1])["result"]


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(
        __doc__, model="resnet20", batch_size=128, dtype="float32", steps=20, warmup=3, repeats=3
    )
    p.add_argument("--image-size", type=int, default=None, help="default: 224 ImageNet, 32 CIFAR")
    p.add_argument("--no-compile", action="store_true", help="PyTorch eager only")
    a = p.parse_args(argv)
    require_torch()
    from resnet_jax import xla_cpu

    # The child inherits these flags (and the record shows them); no JAX starts here.
    xla_cpu.configure(a.cpu_devices, a.cpu_conv)
    jx = measure_jax(a)
    pt = measure_torch(a)
    jax_ips, torch_ips = jx["images_per_sec"]["median"], pt["images_per_sec"]["median"]
    r = {**jx, "torch": pt, "ratio_jax_over_torch": jax_ips / torch_ips}
    kind = "torch.compile" if pt["compile"] else "eager"
    print(
        f"{a.model} train step, batch {a.batch_size}, {a.dtype}, {jx['devices']} x "
        f"{jx['device_kind']}, medians of {a.repeats} x {a.steps} steps:\n"
        f"  JAX (resnet_jax)   {jax_ips:9.1f} images/s  ({jx['step_ms']['median']:.1f} ms/step)\n"
        f"  PyTorch ({kind:13}) {torch_ips:9.1f} images/s  "
        f"({pt['step_ms']['median']:.1f} ms/step) {pt['note']}\n"
        f"  ratio JAX/PyTorch  {r['ratio_jax_over_torch']:.2f}"
    )
    return common.record(r, a.results, benchmark="compare_torch", argv=argv)


if __name__ == "__main__":
    main()
