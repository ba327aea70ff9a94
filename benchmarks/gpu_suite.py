"""One GPU suite (issue 20): every device figure of the project from one prepared command.

Device time comes in one short lease (15 minutes, the machine's start included), so every GPU
figure comes out of *one* command that fits a time budget (``--budget-s``, default 480)::

    PYTHONPATH=src python3 benchmarks/gpu_suite.py --data .device --out $OUT --budget-s 480
    python benchmarks/gpu_suite.py --smoke --out /tmp/suite     # the same code paths, tiny, on the CPU (< 1 min)

The parts, each in its own process (re-invoked as ``gpu_suite.py --part NAME``) with its share of the
budget as a timeout, so a hang or an out-of-memory in one part loses no other:

* ``smoothing_cifar`` / ``smoothing_imagenet``: CERTIFY (n0 = 100, N = 100,000, α = 0.001) of CIFAR
  ResNet-110 (32×32) and ImageNet ResNet-50 (224×224), random weights: certaudit's
  :class:`SmoothedClassifier` (bf16 and fp32, channels-last) against a faithful one-image-per-call
  CERTIFY of Cohen et al. (``bench_smoothing.cohen_certify``: batch 400 / 1000, ``randn`` per batch
  on the device, a host copy and Python counting per batch) and against the forward limit (the
  best forward throughput over a batch sweep);
* ``shadow``: the untargeted Shadow Attack (ResNet-110, 400 copies, 300 steps: s/image) batched
  against the authors' loop structure (one (image, target) pair per call, the copies as the batch)
  and the forward+backward limit (``bench_shadow.run``);
* ``interval``: IBP, CROWN-IBP and CROWN at batch 256 on Wong & Kolter's 2C2F (Fashion-MNIST) and
  CIFAR CNN, against the plain forward pass, auto_LiRPA and convex_adversarial where they import
  (``bench_interval.run_one``);
* ``train_certify``: Gaussian-noise training (σ = 0.25) of ResNet-20 on the staged CIFAR-10 copy,
  data held on the device, bf16 and channels-last, for as many epochs as its share allows
  (``certaudit.train.train``), then CERTIFY of 500 test images with N = 10,000: the
  certified-accuracy table next to Cohen et al.'s ResNet-110 (0.75 / 0.60 / 0.43 / 0.27 at
  r = 0 / 0.25 / 0.5 / 0.75) and the gap explained;
* ``sequential``: accept-at-ε by the sequential test against fixed-N CERTIFY on the trained model
  (evaluations and wall time; ``bench_sequential.run_fixed`` / ``run_sequential``);
* ``smoothing_compile`` (optional, only in time left over): CERTIFY bf16 of the compiled model
  (``torch.compile``) against the eager one.

Every part records rows of ``ours``, ``baseline`` and ``limit`` with the ratios ``ours_over_baseline``
(> 1: ours is better; for a time or a count, lower is better and the ratio is baseline / ours) and
``ours_over_limit`` (the fraction of the hardware limit reached; limit / ours for a time). Results go
to ``OUT/gpu_suite.json`` as each measurement finishes (a killed run keeps what was done),
``OUT/gpu_suite.md`` (the table) and ``OUT/gpu_suite.log``. A part whose share is spent is recorded
as skipped, with the reason. The suite never uses the network: what it needs beyond the
repository is staged by ``benchmarks/stage_device_data.py`` into ``.device/``.

Exit codes: 0 all parts ran or were skipped for a stated reason; 1 a part failed or ran out of time;
2 no CUDA device for the full run (one line, no traceback).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
JSON_NAME, MD_NAME, LOG_NAME = "gpu_suite.json", "gpu_suite.md", "gpu_suite.log"
SIGMA = 0.25
# Cohen et al. (2019), CIFAR-10 ResNet-110 trained and certified at σ = 0.25 (N = 100,000, α = 0.001,
# every 20th test image): certified accuracy at r = 0 / 0.25 / 0.5 / 0.75 (locuslab/smoothing).
COHEN_CIFAR_025 = {0.0: 0.75, 0.25: 0.60, 0.5: 0.43, 0.75: 0.27}
COHEN_EPOCHS, COHEN_TRAIN_IMAGES, COHEN_PARAMS = 90, 50_000, 1.7e6
BASE_NEEDS = ("numpy", "scipy", "PIL", "safetensors")  # what `import certaudit...` pulls in
RESERVE_S = 15.0  # of the budget: the driver's own start, the JSON and Markdown, margins


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    plan_s: float  # seconds of the 480-s plan (scaled to --budget-s)
    min_s: float  # a part is not started with less than this (full run)
    needs: tuple[str, ...] = BASE_NEEDS
    optional: bool = False  # only run in the time the others left over


PARTS = (
    Part("smoothing_cifar", "CERTIFY, CIFAR ResNet-110 32×32 (N = 100,000)", 75, 30),
    Part("smoothing_imagenet", "CERTIFY, ImageNet ResNet-50 224×224 (N = 100,000)", 95, 30),
    Part("shadow", "untargeted Shadow Attack, ResNet-110, 400 copies × 300 steps", 55, 25,
         BASE_NEEDS + ("pytorch_msssim",)),
    Part("interval", "IBP / CROWN-IBP / CROWN at batch 256 (2C2F, CIFAR CNN)", 45, 15),
    Part("train_certify", "Gaussian training of ResNet-20 (σ = 0.25), then CERTIFY N = 10,000", 150, 60,
         BASE_NEEDS + ("rich",)),
    Part("sequential", "sequential accept-at-ε vs fixed-N CERTIFY", 45, 20),
    Part("smoothing_compile", "CERTIFY bf16 with torch.compile vs eager (optional)", 60, 60, optional=True),
)
PART_BY_NAME = {p.name: p for p in PARTS}


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the full run and ``--smoke`` (the code paths do not)."""

    device: str = "cuda"
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    min_n: int = 10_000  # N is lowered to this at most, and only when the part's share is short
    forward_seconds: float = 1.0  # per forward-throughput measurement
    smoothing_batch: int | None = None  # CERTIFY's samples per forward pass (None: certaudit's choice from memory)
    cifar_arch: str = "resnet110"
    cifar_shape: tuple[int, int, int] = (3, 32, 32)
    cifar_images: int = 4
    cifar_baseline_batch: int = 400  # locuslab/smoothing's README for CIFAR-10
    imagenet_arch: str = "resnet50"
    imagenet_shape: tuple[int, int, int] = (3, 224, 224)
    imagenet_images: int = 1
    imagenet_baseline_batch: int = 1000  # locuslab/smoothing's certify.py default
    baseline_images: int = 1
    shadow_arch: str = "resnet110"
    shadow_images: int = 1
    shadow_samples: int = 400
    shadow_steps: int = 300  # the reported attack; fewer are timed when the share is short (scaled)
    shadow_probe_steps: int = 2
    interval_batch: int = 256
    interval_reps: int = 5
    interval_crown_models: tuple[str, ...] = ("2c2f", "cifar_cnn")  # where CROWN and the KW dual bound run
    train_arch: str = "resnet20"
    train_batch: int = 512
    train_lr: float = 0.2
    train_images: int | None = None  # None: every staged training image
    train_probe_images: int = 8192
    train_max_epochs: int = 200
    train_precision: str = "bf16"
    certify_images: int = 500
    certify_n: int = 10_000
    seq_images: int = 50
    seq_eps: tuple[float, ...] = (0.25, 0.5)
    compile_backend: str = "inductor"
    compile_arch: str = "resnet110"
    compile_images: int = 2
    smoke: bool = False


FULL = Sizes()
# --smoke: CPU, ResNet-20 on 8×8 inputs instead of ResNet-110 on 32×32 and, with 1000 classes on 16×16,
# instead of ResNet-50 on 224×224 (a ResNet-50 call costs ~0.5 s on 2 cores whatever the batch), N = 200,
# one shadow step, batch 4 for the bounds (CROWN on the 2C2F only), one step of fp32 training (bf16
# autocast on CPUs without AMX is ~10x slower; tests/test_gpu_suite.py checks the bf16 wrapper), and
# torch.compile with the "eager" backend on a 2C2F (tracing a ResNet costs ~5 s per graph on the CPU).
SMOKE = Sizes(device="cpu", n0=16, n=200, min_n=200, forward_seconds=0.05, smoothing_batch=64, cifar_arch="resnet20",
              cifar_shape=(3, 8, 8), cifar_images=1, cifar_baseline_batch=64, imagenet_arch="resnet20",
              imagenet_shape=(3, 16, 16),
              imagenet_baseline_batch=64, shadow_arch="2c2f", shadow_samples=8, shadow_steps=1,
              shadow_probe_steps=1, interval_batch=4, interval_reps=1, interval_crown_models=("2c2f",),
              train_batch=8, train_lr=0.05, train_images=8, train_probe_images=8, train_max_epochs=1,
              train_precision="fp32", certify_images=2, certify_n=100, seq_images=2, seq_eps=(0.25,),
              compile_backend="eager", compile_arch="2c2f", compile_images=1, smoke=True)


# ------------------------------------------------------------------------------------ recording

def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None, tuples lists, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def read_doc(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def write_doc(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(_clean(doc), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def ratio(ours: float | None, other: float | None, higher_is_better: bool) -> float | None:
    """ours/other for rates, other/ours for times and counts: > 1 is always ours better."""
    if ours is None or other is None or ours <= 0 or other <= 0:
        return None
    return ours / other if higher_is_better else other / ours


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1e5 or abs(v) < 1e-3:
            return f"{v:.{digits}g}"
        return f"{v:,.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


class Recorder:
    """A part's results in the suite's JSON, saved after every change (a killed part keeps them)."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name

    def _update(self, fn: Callable[[dict], None]) -> None:
        doc = read_doc(self.path)
        fn(doc["parts"][self.name])
        write_doc(self.path, doc)

    def row(self, key: str, what: str, unit: str, ours: float | None, baseline: float | None = None,
            limit: float | None = None, *, higher_is_better: bool = True, baseline_kind: str = "measured",
            limit_kind: str = "forward", note: str = "") -> dict:
        r = {"key": key, "what": what, "unit": unit, "ours": ours, "baseline": baseline, "limit": limit,
             "higher_is_better": higher_is_better, "baseline_kind": baseline_kind, "limit_kind": limit_kind,
             "ours_over_baseline": ratio(ours, baseline, higher_is_better),
             "ours_over_limit": ratio(ours, limit, higher_is_better), "note": note}

        def put(part: dict) -> None:
            rows = [x for x in part["rows"] if x["key"] != key]
            part["rows"] = rows + [_clean(r)]

        self._update(put)
        print(f"[{self.name}] {what}: ours {fmt(ours)} {unit} | baseline {fmt(baseline)} ({baseline_kind}) "
              f"→ ours/baseline {fmt(r['ours_over_baseline'])}× | limit {fmt(limit)} ({limit_kind}) "
              f"→ ours/limit {fmt(r['ours_over_limit'])}" + (f" | {note}" if note else ""), flush=True)
        return r

    def detail(self, key: str, value: Any) -> None:
        self._update(lambda part: part["details"].__setitem__(key, _clean(value)))

    def note(self, text: str) -> None:
        self._update(lambda part: part["notes"].append(text))
        print(f"[{self.name}] note: {text}", flush=True)

    def finish(self, status: str, reason: str | None = None) -> None:
        def put(part: dict) -> None:
            part["status"], part["reason"] = status, reason

        self._update(put)


class Clock:
    """Seconds left until a part's deadline (wall clock)."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()


class Skip(Exception):
    """A part, or a piece of one, cannot run here for a stated reason (not a failure)."""


@dataclass
class Ctx:
    rec: Recorder
    sizes: Sizes
    clock: Clock
    data: Path
    work: Path
    dev: Any = None  # torch.device


# ------------------------------------------------------------------------------------ helpers

def _bench(name: str):
    """One of the benchmark scripts beside this file, as a module (their code paths are reused)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return __import__(name)


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev, fn: Callable[[], Any]) -> tuple[Any, float]:
    """(result, seconds) of ``fn()``, the device synchronised before and after."""
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t0


def plan_samples(images: int, n0: int, n: int, rate: float, seconds: float, min_n: int) -> tuple[int, int]:
    """(images, N) that fit ``seconds`` at ``rate`` samples/s: fewer images first, then a smaller N (≥ ``min_n``)."""
    per = n0 + n
    if rate <= 0 or seconds <= 0:
        return 1, min(n, max(min_n, 1))
    k = min(images, int(seconds * rate // per))
    if k >= 1:
        return k, n
    return 1, max(min(min_n, n), min(n, int(seconds * rate) - n0))


def device_info(dev) -> dict:
    import torch

    info = {"device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update({"name": props.name, "capability": f"{props.major}.{props.minor}",
                     "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
                     "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                     "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32})
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def forward_sweep(model, shape, batches, dev, precision: str, channels_last: bool, seconds: float) -> dict[int, float]:
    """Samples/s of the plain forward pass at each batch size (``bench_smoothing.forward_rate``); an
    out-of-memory batch is left out."""
    import torch

    bs = _bench("bench_smoothing")
    out: dict[int, float] = {}
    for b in sorted(set(batches)):
        try:
            out[b] = bs.forward_rate(model, shape, b, dev, precision, channels_last, seconds)["wall"]
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------ smoothing

def part_smoothing(ctx: Ctx, kind: str) -> None:
    """CERTIFY throughput: ours (bf16, then fp32) vs Cohen et al.'s one-image loop vs the forward limit."""
    import torch

    from certaudit.defenses.smoothing import SmoothedClassifier
    from certaudit.models import build_model

    bs = _bench("bench_smoothing")
    sz, dev, rec, clock = ctx.sizes, ctx.dev, ctx.rec, ctx.clock
    if kind == "cifar":
        arch, shape, classes, images, bbatch = sz.cifar_arch, sz.cifar_shape, 10, sz.cifar_images, sz.cifar_baseline_batch
    else:
        arch, shape, classes, images, bbatch = (sz.imagenet_arch, sz.imagenet_shape, 1000, sz.imagenet_images,
                                                sz.imagenet_baseline_batch)
    cl = dev.type == "cuda"
    # bench_smoothing's Cohen loop counts into arrays of its module-level NUM_CLASSES (10 there)
    bs.NUM_CLASSES = classes
    torch.manual_seed(0)
    model = build_model(arch, shape, classes).to(dev).eval()
    if cl:
        model = model.to(memory_format=torch.channels_last)
    x = torch.rand((images, *shape), generator=torch.Generator().manual_seed(1))
    rec.detail("setup", {"arch": arch, "input": list(shape), "classes": classes, "weights": "random (seed 0)",
                         "n0": sz.n0, "n": sz.n, "alpha": sz.alpha, "sigma": SIGMA, "channels_last": cl,
                         "baseline": f"Cohen et al.'s CERTIFY, one image per call, batch {bbatch}",
                         **device_info(dev)})
    rates: dict[str, dict] = {}
    precisions = ("bf16", "fp32")
    for i, precision in enumerate(precisions):
        pass_end = time.time() + clock.left() / (len(precisions) - i)
        if clock.left() < 5:
            rec.note(f"{precision}: skipped, the part's share is spent")
            continue
        sc = SmoothedClassifier(model, classes, SIGMA, batch_size=sz.smoothing_batch, precision=precision,
                                channels_last=cl, n0=sz.n0, n=sz.n, alpha=sz.alpha)
        b = sc.resolve_batch_size(shape)
        sweep = {bbatch, max(1, b // 4), max(1, b // 2), b} | ({2 * b} if kind == "cifar" else set())
        # warm-up of both code paths (kernels, allocator, cuDNN / oneDNN plans of every batch shape the
        # baseline will see: n0, a full batch and N's remainder)
        sc.certify(x[:1], n=min(sz.n, 2 * b), seed=0)
        bs.cohen_certify(model, x[:1], sz.n0, min(sz.n, bbatch + sz.n % bbatch), sz.alpha, bbatch, dev, precision, cl)
        fwd = forward_sweep(model, shape, sweep, dev, precision, cl, sz.forward_seconds)
        best_b = max(fwd, key=fwd.get)
        est = 0.85 * fwd.get(b, fwd[best_b])
        k, n_ours = plan_samples(images, sz.n0, sz.n, est, 0.5 * (pass_end - time.time()), sz.min_n)
        cert, t_ours = timed(dev, lambda: sc.certify(x[:k], n=n_ours, seed=0))
        ours = k * (sz.n0 + n_ours) / t_ours
        base_est = 0.6 * fwd.get(bbatch, est)
        kb, n_base = plan_samples(min(sz.baseline_images, images), sz.n0, sz.n, base_est,
                                  0.9 * (pass_end - time.time()), sz.min_n)
        if n_base < sz.n:  # whole baseline batches: no batch shape that the warm-up did not see
            n_base = max(min(bbatch, sz.n), n_base - n_base % bbatch)
        base_out, t_base = timed(dev, lambda: bs.cohen_certify(model, x[:kb], sz.n0, n_base, sz.alpha, bbatch, dev,
                                                               precision, cl))
        base = kb * (sz.n0 + n_base) / t_base
        agree = [int(cert.label[j]) == int(base_out[j][0]) for j in range(min(k, kb))]
        rates[precision] = {"ours": ours, "baseline": base, "forward_best": fwd[best_b], "forward_best_batch": best_b}
        rec.detail(precision, {"certify_batch": b, "forward_by_batch": {str(k2): v for k2, v in fwd.items()},
                               "forward_best_batch": best_b, "ours_images": k, "ours_n": n_ours,
                               "ours_seconds": t_ours, "ours_seconds_per_image": t_ours / k,
                               "baseline_images": kb, "baseline_n": n_base, "baseline_seconds": t_base,
                               "baseline_seconds_per_image": t_base / kb, "same_label_as_baseline": agree})
        short = "" if n_ours == sz.n and n_base == sz.n else \
            f"; N lowered to {n_ours:,} (ours) / {n_base:,} (baseline) to fit the share: samples/s barely depends on N"
        rec.row(f"certify_{precision}", f"CERTIFY {arch} {precision}", "samples/s", ours, base, fwd[best_b],
                baseline_kind=f"Cohen loop {precision}, batch {bbatch}",
                limit_kind=f"forward {precision}, best batch {best_b}",
                note=f"{k} image(s) ours, {kb} baseline; CERTIFY batch {b}{short}")
    if "bf16" in rates and "fp32" in rates:
        rec.row("certify_bf16_vs_fp32_baseline", f"CERTIFY {arch} bf16 vs Cohen's fp32 loop", "samples/s",
                rates["bf16"]["ours"], rates["fp32"]["baseline"], rates["bf16"]["forward_best"],
                baseline_kind=f"Cohen loop fp32, batch {bbatch}", limit_kind="forward bf16",
                note="the precision the published code ran in; a bf16 certificate is about the model as run in bf16")


def part_smoothing_cifar(ctx: Ctx) -> None:
    part_smoothing(ctx, "cifar")


def part_smoothing_imagenet(ctx: Ctx) -> None:
    part_smoothing(ctx, "imagenet")


def part_smoothing_compile(ctx: Ctx) -> None:
    """CERTIFY bf16 of ``torch.compile(model)`` against the same eager model, both certaudit's."""
    import torch

    from certaudit.defenses.smoothing import SmoothedClassifier
    from certaudit.models import build_model

    sz, dev, rec = ctx.sizes, ctx.dev, ctx.rec
    shape, cl = sz.cifar_shape, dev.type == "cuda"
    torch.manual_seed(0)
    model = build_model(sz.compile_arch, shape, 10).to(dev).eval()
    if cl:
        model = model.to(memory_format=torch.channels_last)
    x = torch.rand((sz.compile_images, *shape), generator=torch.Generator().manual_seed(1))
    eager = SmoothedClassifier(model, 10, SIGMA, batch_size=sz.smoothing_batch, precision="bf16", channels_last=cl,
                               n0=sz.n0, n=sz.n, alpha=sz.alpha)
    b = eager.resolve_batch_size(shape)
    eager.certify(x[:1], n=min(sz.n, 2 * b), seed=0)
    cert_e, t_e = timed(dev, lambda: eager.certify(x, seed=0))
    compiled = torch.compile(model, backend=sz.compile_backend)
    sc = SmoothedClassifier(compiled, 10, SIGMA, batch_size=b, precision="bf16", channels_last=cl, n0=sz.n0, n=sz.n,
                            alpha=sz.alpha)
    _, t_first = timed(dev, lambda: sc.certify(x, seed=0))  # compiles every batch shape of this call
    cert_c, t_c = timed(dev, lambda: sc.certify(x, seed=0))
    per = x.shape[0] * (sz.n0 + sz.n)
    fwd_e = forward_sweep(model, shape, [b], dev, "bf16", cl, sz.forward_seconds).get(b)
    fwd_c = forward_sweep(compiled, shape, [b], dev, "bf16", cl, sz.forward_seconds).get(b)
    rec.detail("compile", {"backend": sz.compile_backend, "batch": b, "first_call_seconds": t_first,
                           "compile_seconds_estimate": t_first - t_c, "eager_seconds": t_e, "compiled_seconds": t_c,
                           "forward_eager": fwd_e, "forward_compiled": fwd_c,
                           "same_labels": bool(torch.equal(cert_e.label, cert_c.label)), **device_info(dev)})
    rec.row("certify_bf16_compiled", f"CERTIFY {sz.compile_arch} bf16, torch.compile ({sz.compile_backend})",
            "samples/s", per / t_c, per / t_e, max(v for v in (fwd_e, fwd_c) if v),
            baseline_kind="certaudit eager bf16", limit_kind=f"forward bf16 at batch {b} (better of eager, compiled)",
            note=f"compilation took ~{t_first - t_c:.0f} s (not counted)")


# ------------------------------------------------------------------------------------ shadow

def part_shadow(ctx: Ctx) -> None:
    """Seconds per image of the 300-step untargeted attack: batched vs the authors' loop vs fwd+bwd."""
    sz, rec, clock = ctx.sizes, ctx.rec, ctx.clock
    bsh = _bench("bench_shadow")

    def run(steps: int) -> dict:
        ns = argparse.Namespace(device=str(ctx.dev), arch=sz.shadow_arch, channels_in=3, size=sz.cifar_shape[1], classes=10,
                                images=sz.shadow_images, steps=steps, samples=sz.shadow_samples, sigma=SIGMA,
                                channels=1, noise="fixed", repeats=1, threads=0, json=None)
        return bsh.run(ns)

    t0 = time.time()
    probe = run(sz.shadow_probe_steps)
    probe_wall = time.time() - t0
    per_step = (probe["seconds_batched"] + probe["seconds_loop"]) / sz.shadow_probe_steps
    overhead = max(0.0, probe_wall - per_step * sz.shadow_probe_steps)  # model, warm-up, the limit loop
    steps = int(max(sz.shadow_probe_steps, min(sz.shadow_steps, (0.85 * clock.left() - overhead) // max(per_step, 1e-9))))
    res = probe if steps <= sz.shadow_probe_steps else run(steps)
    scale = sz.shadow_steps / res["steps"] / res["images"]
    rec.detail("probe", probe)
    rec.detail("timed", res)
    rec.detail("setup", {"arch": sz.shadow_arch, "copies": sz.shadow_samples, "steps_reported": sz.shadow_steps,
                         "steps_timed": res["steps"], "pairs": res["pairs"], **device_info(ctx.dev)})
    note = "" if res["steps"] == sz.shadow_steps else \
        f"timed {res['steps']} steps, scaled to {sz.shadow_steps} (fixed noise: every step costs the same)"
    rec.row("untargeted_s_per_image", f"Shadow Attack {sz.shadow_arch}, {res['pairs'] // res['images']} targets × "
            f"{sz.shadow_samples} copies × {sz.shadow_steps} steps", "s/image", res["seconds_batched"] * scale,
            res["seconds_loop"] * scale, res["seconds_fwd_bwd_limit"] * scale, higher_is_better=False,
            baseline_kind="authors' loop: one (image, target) per call", limit_kind="forward+backward at the chunk size",
            note=note)
    if res["max_abs_delta_difference"] > 1e-3:
        rec.note(f"batched and looped perturbations differ by {res['max_abs_delta_difference']:.2e} (expected ~0)")


# ------------------------------------------------------------------------------------ interval

def part_interval(ctx: Ctx) -> None:
    """Bounds per second at batch 256: ours vs the forward pass, auto_LiRPA and convex_adversarial."""
    import torch

    sz, rec, dev = ctx.sizes, ctx.rec, ctx.dev
    bi = _bench("bench_interval")
    bi.DATA_ROOTS = {"cifar10": ctx.data / "cifar10", "fashion-mnist": ctx.data / "fashion-mnist"}  # staged copies
    models = [("2c2f", "2C2F (Wong & Kolter, Fashion-MNIST)", ctx.data / "kw" / "fashion_mnist.pth"),
              ("cifar_cnn", "CIFAR CNN (Wong & Kolter cifar_small 8px, stage 0)", ctx.data / "kw" / "cifar_small_8px.pth")]
    libs = {"alirpa": "auto_LiRPA", "oracle": "convex_adversarial"}
    missing = {who: mod for who, mod in libs.items() if importlib.util.find_spec(mod) is None}
    for who, mod in missing.items():
        rec.note(f"{mod}: not installed: skipped")
    rec.detail("setup", {"batch": sz.interval_batch, "reps": sz.interval_reps, **device_info(dev)})
    done = 0
    for tag, label, path in models:
        if not path.is_file():
            rec.note(f"{label}: {path} not staged: skipped (benchmarks/stage_device_data.py)")
            continue
        model, dataset, name = bi._load_model(str(path), dev)
        shape = tuple(bi._images(dataset, 1)[0].shape[1:])
        fwd = forward_sweep(model, shape, [sz.interval_batch], dev, "fp32", False, sz.forward_seconds).get(sz.interval_batch)
        out: dict[str, dict] = {}
        for case in ("ours:ibp", "ours:crown-ibp", "ours:crown", "ours:crown-kw", "alirpa:ibp", "alirpa:crown-ibp",
                     "alirpa:crown", "oracle:kw"):
            who, what = case.split(":")
            if who in missing:
                continue
            if ctx.clock.left() < 3:
                rec.note(f"{label} {case}: skipped, the part's share is spent")
                continue
            slow = "crown" in what and "ibp" not in what
            if (slow or who == "oracle") and tag not in sz.interval_crown_models:
                continue
            reps = max(1, sz.interval_reps // 3) if slow else sz.interval_reps
            try:
                out[case] = bi.run_one(case, sz.interval_batch, str(dev), None, reps, str(path))
            except Exception as exc:  # a baseline that breaks here is reported, ours is not excused
                if who == "ours":
                    raise
                rec.note(f"{label} {case}: failed ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        rec.detail(tag, {"model": name, "dataset": dataset, "forward_images_per_s": fwd, "cases": out})
        for method in ("ibp", "crown-ibp", "crown", "crown-kw"):
            ours = out.get(f"ours:{method}")
            if ours is None:
                continue
            theirs = out.get("oracle:kw" if method == "crown-kw" else f"alirpa:{method}")
            kind = "convex_adversarial DualNetwork" if method == "crown-kw" else f"auto_LiRPA {method}"
            rec.row(f"{tag}_{method}", f"{method} bounds, {label}", "images/s", ours["images_per_s"],
                    theirs["images_per_s"] if theirs else None, fwd, baseline_kind=kind if theirs else f"{kind}: not run",
                    limit_kind=f"plain forward at batch {sz.interval_batch}",
                    note=f"verified {ours['verified_in_batch']}/{sz.interval_batch}"
                         + (f" (theirs {theirs['verified_in_batch']})" if theirs else "")
                         + ("" if ours["real_images"] else "; random images (no staged test set)"))
            done += 1
    if not done:
        raise Skip("no model staged (run benchmarks/stage_device_data.py)")


# ------------------------------------------------------------------------------------ training

def _precision_module(model, precision: str, channels_last: bool):
    """The model run under bf16 autocast (fp32 logits out) on channels-last inputs: what train() calls."""
    import torch
    from torch import nn

    class Run(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if precision == "bf16":
                with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
                    return self.inner(x).float()
            return self.inner(x)

    return Run(model)


def train_step_rate(net, shape, batch: int, dev, seconds: float) -> float:
    """Images/s of forward + backward (parameter gradients, no optimizer) on a fixed random batch."""
    import torch
    import torch.nn.functional as F

    x = torch.rand((batch, *shape), device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    net.train()

    def step() -> None:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()

    for _ in range(2):
        step()
    sync(dev)
    reps, t0 = 0, time.perf_counter()
    while True:
        step()
        reps += 1
        if reps % 4 == 0 or dev.type == "cpu":
            sync(dev)
            if time.perf_counter() - t0 >= seconds:
                break
    return reps * batch / (time.perf_counter() - t0)


class _OutOfTime(Exception):
    pass


def part_train_certify(ctx: Ctx) -> None:
    """Noisy training of ResNet-20 in the part's share, then CERTIFY of 500 test images (N = 10,000)."""
    import numpy as np
    import torch

    from certaudit.data import load_dataset
    from certaudit.defenses.smoothing import SmoothedClassifier, clopper_pearson_lower
    from certaudit.errors import DataNotFoundError
    from certaudit.models import build_model
    from certaudit.train import TrainConfig, train

    sz, dev, rec, clock = ctx.sizes, ctx.dev, ctx.rec, ctx.clock
    root = ctx.data / "cifar10"
    try:
        x_tr, y_tr = load_dataset("cifar10", "train", root=root, download=False)
        x_te, y_te = load_dataset("cifar10", "test", root=root, download=False)
    except DataNotFoundError as exc:
        raise Skip(f"no staged CIFAR-10 copy in {root} (run benchmarks/stage_device_data.py): {exc}") from None
    if sz.train_images:
        x_tr, y_tr = x_tr[:sz.train_images], y_tr[:sz.train_images]
    shape, cl, prec = tuple(x_tr.shape[1:]), dev.type == "cuda", sz.train_precision
    n_train = int(y_tr.shape[0])

    def fresh(precision: str, layout: bool):
        torch.manual_seed(0)
        inner = build_model(sz.train_arch, shape, 10).to(dev)
        if layout:
            inner = inner.to(memory_format=torch.channels_last)
        return inner, _precision_module(inner, precision, layout)

    def config(epochs: int) -> TrainConfig:
        return TrainConfig(method="gaussian", sigma=SIGMA, epochs=epochs, batch_size=sz.train_batch, lr=sz.train_lr,
                           optimizer="sgd", momentum=0.9, weight_decay=5e-4, schedule="cosine",
                           warmup_epochs=min(2.0, 0.05 * epochs), augment="flipcrop", seed=0)

    def probe_rate(precision: str, layout: bool) -> float:
        """Images/s of train() itself over one epoch of a subset (after a warm-up epoch)."""
        _, net = fresh(precision, layout)
        k = min(n_train, sz.train_probe_images)
        train(net, x_tr[:min(k, 2 * sz.train_batch)], y_tr[:min(k, 2 * sz.train_batch)], config(1), device=dev,
              progress=False)
        res = train(net, x_tr[:k], y_tr[:k], config(1), device=dev, progress=False)
        return k / res.history[0]["seconds"]

    rec.detail("setup", {"arch": sz.train_arch, "train_images": n_train, "test_images_staged": int(y_te.shape[0]),
                         "precision": prec, "channels_last": cl, "batch": sz.train_batch, "lr": sz.train_lr,
                         "sigma": SIGMA, "augment": "flipcrop", "optimizer": "sgd nesterov 0.9, wd 5e-4, cosine",
                         **device_info(dev)})
    ours_probe = probe_rate(prec, cl)
    base_probe = probe_rate("fp32", False)
    _, limit_net = fresh(prec, cl)
    limit = train_step_rate(limit_net, shape, sz.train_batch, dev, sz.forward_seconds)
    del limit_net
    rec.detail("probes", {"ours_images_per_s": ours_probe, "fp32_nchw_images_per_s": base_probe,
                          "fwd_bwd_images_per_s": limit})

    # CERTIFY's cost, to leave room for it: its batch and forward rate on the (untrained) model
    inner, net = fresh(prec, cl)
    sc_probe = SmoothedClassifier(inner, 10, SIGMA, batch_size=sz.smoothing_batch, precision=prec, channels_last=cl,
                                  n0=sz.n0, n=sz.certify_n, alpha=sz.alpha)
    b = sc_probe.resolve_batch_size(shape)
    fwd = forward_sweep(inner, shape, [b], dev, prec, cl, sz.forward_seconds)[b]
    k_cert = min(sz.certify_images, int(y_te.shape[0]))
    certify_est = k_cert * (sz.n0 + sz.certify_n) / (0.7 * fwd) + 5.0
    train_seconds = clock.left() - certify_est - 10.0
    epochs = int(max(1, min(sz.train_max_epochs, train_seconds * 0.9 * ours_probe // n_train)))
    train_deadline = time.time() + max(train_seconds, 1.0)
    history: list[dict] = []

    def on_epoch(row: dict) -> None:
        history.append(row)
        if len(history) % 10 == 0 or len(history) == epochs:
            rec.detail("history", history)
            print(f"[train_certify] epoch {len(history)}/{epochs}: loss {row['loss']:.3f}, train accuracy "
                  f"{row['train_accuracy']:.3f}, test accuracy {row.get('test_accuracy', float('nan')):.3f}, "
                  f"{row['seconds']:.2f} s/epoch", flush=True)
        if time.time() > train_deadline and len(history) < epochs:
            raise _OutOfTime()

    rec.note(f"training {epochs} epoch(s) of {n_train:,} images (planned from {ours_probe:,.0f} images/s; "
             f"{max(train_seconds, 0):.0f} s for training, ~{certify_est:.0f} s kept for CERTIFY)")
    t0 = time.perf_counter()
    stopped = False
    try:
        train(net, x_tr, y_tr, config(epochs), x_test=x_te, y_test=y_te, device=dev, progress=False, on_epoch=on_epoch)
    except _OutOfTime:
        stopped = True
        rec.note(f"training stopped after {len(history)} of {epochs} epochs: its time was spent")
    train_wall = time.perf_counter() - t0
    net.eval()
    rec.detail("history", history)
    seconds = sum(h["seconds"] for h in history)
    ours_rate = len(history) * n_train / seconds if seconds > 0 else None
    layout = ", channels-last" if cl else ""
    rec.row("train_images_per_s", f"Gaussian training {sz.train_arch} ({prec}{layout}, data on the device)",
            "images/s", ours_rate, base_probe, limit, baseline_kind="the same loop in fp32, NCHW (probe epoch)",
            limit_kind=f"forward+backward at batch {sz.train_batch}, {prec}",
            note=f"{len(history)} epochs in {train_wall:.0f} s" + (" (stopped early)" if stopped else ""))
    path = ctx.work / "train_resnet20.pt"
    torch.save({"arch": sz.train_arch, "state_dict": inner.state_dict(), "sigma": SIGMA, "precision": prec,
                "epochs": len(history)}, path)

    # CERTIFY of the first k_cert staged test images (a seeded random sample of the test split)
    sc = SmoothedClassifier(inner, 10, SIGMA, batch_size=b, precision=prec, channels_last=cl, n0=sz.n0,
                            n=sz.certify_n, alpha=sz.alpha, seed=0)
    chunk = max(1, sc.images_per_chunk(shape))
    labels, radii, t_cert = [], [], 0.0
    for a in range(0, k_cert, chunk):
        if clock.left() < 3:
            rec.note(f"CERTIFY stopped after {a} of {k_cert} images: the part's share is spent")
            break
        e = min(k_cert, a + chunk)
        cert, dt = timed(dev, lambda: sc.certify(x_te[a:e], indices=list(range(a, e))))
        labels.append(cert.label)
        radii.append(cert.radius)
        t_cert += dt
    if not labels:
        raise Skip("no time left for CERTIFY")
    label, radius = torch.cat(labels), torch.cat(radii)
    y = y_te[:label.shape[0]]
    done = int(label.shape[0])
    correct = (label == y).numpy()
    table = {r: float(np.mean(correct & (radius.numpy() >= r))) for r in COHEN_CIFAR_025}
    certify_rate = done * (sz.n0 + sz.certify_n) / t_cert
    rec.row("certify_samples_per_s", f"CERTIFY {sz.train_arch} {prec}, N = {sz.certify_n:,}", "samples/s",
            certify_rate, None, fwd, baseline_kind="see smoothing_cifar", limit_kind=f"forward {prec} at batch {b}",
            note=f"{done} images in {t_cert:.1f} s")
    for r, ours in table.items():
        rec.row(f"certified_accuracy_r{r:g}", f"certified accuracy at r = {r:g} ({done} test images)", "fraction",
                ours, COHEN_CIFAR_025[r], None, baseline_kind="Cohen et al. ResNet-110 (published)", limit_kind="–")
    # the gap, from the facts of this run
    p_max = float(clopper_pearson_lower([sz.certify_n], sz.certify_n, sz.alpha)[0])
    p_max_100k = float(clopper_pearson_lower([100_000], 100_000, sz.alpha)[0])
    from scipy.stats import norm

    r_max, r_max_100k = SIGMA * norm.ppf(p_max), SIGMA * norm.ppf(p_max_100k)
    params = sum(p.numel() for p in inner.parameters())
    clean = history[-1].get("test_accuracy") if history else None
    se = math.sqrt(0.25 / max(done, 1))
    gap = (f"Cohen et al.: ResNet-110 ({COHEN_PARAMS / 1e6:.1f} M parameters), {COHEN_TRAIN_IMAGES:,} official training "
           f"images, {COHEN_EPOCHS} epochs ({COHEN_EPOCHS * COHEN_TRAIN_IMAGES / 1e6:.1f} M noisy samples), N = 100,000. "
           f"Here: {sz.train_arch} ({params / 1e6:.2f} M parameters), {n_train:,} images of the JPEG copy, "
           f"{len(history)} epochs ({len(history) * n_train / 1e6:.1f} M noisy samples) in {train_wall:.0f} s; "
           f"clean test accuracy (no noise) {fmt(clean)}. N = {sz.certify_n:,} caps the radius at σ·Φ⁻¹(α^(1/N)) = "
           f"{r_max:.2f} (N = 100,000: {r_max_100k:.2f}) and lowers every radius a little, so the gap grows with r; "
           f"{done} images give a standard error of about {se:.3f} on each figure.")
    rec.detail("certified_accuracy", {"table": {f"{r:g}": v for r, v in table.items()},
                                      "cohen": {f"{r:g}": v for r, v in COHEN_CIFAR_025.items()},
                                      "abstain": float((label == -1).float().mean()), "images": done,
                                      "certify_seconds": t_cert, "r_max": r_max, "gap": gap})
    rec.note(gap)


# ------------------------------------------------------------------------------------ sequential

def part_sequential(ctx: Ctx) -> None:
    """Evaluations and wall time of accept-at-ε: the sequential test vs fixed-N CERTIFY."""
    import numpy as np
    import torch

    from certaudit.data import load_dataset
    from certaudit.defenses.base import ABSTAIN
    from certaudit.defenses.smoothing import SmoothedClassifier
    from certaudit.models import build_model, load_checkpoint

    sz, dev, rec, clock = ctx.sizes, ctx.dev, ctx.rec, ctx.clock
    bq = _bench("bench_sequential")
    ckpt = ctx.work / "train_resnet20.pt"
    cl = dev.type == "cuda"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model = build_model(state["arch"], (3, 32, 32), 10)
        model.load_state_dict(state["state_dict"])
        x, y = load_dataset("cifar10", "test", root=ctx.data / "cifar10", download=False)
        source, prec = f"{state['arch']} trained by train_certify ({state['epochs']} epochs)", state["precision"]
    else:
        from certaudit.zoo import load_data, model_path

        model, _meta = load_checkpoint(model_path("digits_gaussian"))
        x, y = load_data()
        source, prec, cl = "the zoo's digits_gaussian 2C2F (train_certify left no model)", "fp32", False
        rec.note("no model from train_certify in this run: the zoo's digits model is used")
    model = model.to(dev).eval()
    shape = tuple(x.shape[1:])
    sc = SmoothedClassifier(model, 10, SIGMA, batch_size=sz.smoothing_batch, precision=prec, channels_last=cl,
                            n0=sz.n0, n=sz.n, alpha=sz.alpha, seed=0)
    b = sc.resolve_batch_size(shape)
    sc.certify(x[:1], n=min(sz.n, 2 * b))  # warm-up
    fwd = forward_sweep(model, shape, [b], dev, prec, cl, sz.forward_seconds)[b]
    k, n = plan_samples(min(sz.seq_images, int(y.shape[0])), sz.n0, sz.n, 0.85 * fwd, 0.45 * clock.left(), sz.min_n)
    if n != sz.n:
        sc = SmoothedClassifier(model, 10, SIGMA, batch_size=b, precision=prec, channels_last=cl, n0=sz.n0, n=n,
                                alpha=sz.alpha, seed=0)
        rec.note(f"N lowered to {n:,} (fixed N and the sequential budget alike) to fit the part's share")
    x, y = x[:k], y[:k]
    rec.detail("setup", {"model": source, "precision": prec, "channels_last": cl, "images": k, "n0": sz.n0, "n": n,
                         "alpha": sz.alpha, "batch": b, "forward_samples_per_s": fwd, **device_info(dev)})
    for stale in ctx.work.glob("seq_*.jsonl*"):  # scratch rows of an earlier run (RowWriter would resume them)
        stale.unlink()
    t0 = time.perf_counter()
    fixed = bq.run_fixed(sc, x, ctx.work / "seq_fixed.jsonl", chunk=max(1, sc.images_per_chunk(shape)))
    fixed_wall = time.perf_counter() - t0
    fixed_sec = fixed_wall / k
    for eps in sz.seq_eps:
        if clock.left() < 3:
            rec.note(f"ε = {eps:g}: skipped, the part's share is spent")
            continue
        t0 = time.perf_counter()
        seq = bq.run_sequential(sc, x, eps, ctx.work / f"seq_eps{eps:g}.jsonl", chunk=k)
        wall = time.perf_counter() - t0
        idx = list(range(k))
        f_acc = np.array([fixed[i]["label"] if fixed[i]["radius"] >= eps else ABSTAIN for i in idx])
        s_acc = np.array([seq[i]["label"] for i in idx])
        evals = np.array([seq[i]["samples"] for i in idx], dtype=np.float64)
        truth = y.numpy()
        rec.detail(f"eps_{eps:g}", {
            "agreement_with_fixed": float(np.mean(f_acc == s_acc)), "evaluations_mean": float(evals.mean()),
            "evaluations_median": float(np.median(evals)), "evaluations_max": float(evals.max()),
            "seconds_per_image": wall / k, "fixed_seconds_per_image": fixed_sec,
            "certified_accuracy_fixed": float(np.mean(f_acc == truth)),
            "certified_accuracy_sequential": float(np.mean(s_acc == truth)),
            "decisions": {d: sum(seq[i]["decision"] == d for i in idx) for d in sorted({seq[i]["decision"] for i in idx})}})
        rec.row(f"evaluations_eps{eps:g}", f"model evaluations per image, accept at ε = {eps:g}", "evaluations/image",
                float(evals.mean()), float(sz.n0 + n), None, higher_is_better=False,
                baseline_kind=f"fixed N = {n:,} (+ n0)", limit_kind="–",
                note=f"{k} images; decisions agree with fixed N on {np.mean(f_acc == s_acc):.0%}")
        rec.row(f"wall_eps{eps:g}", f"wall time per image, accept at ε = {eps:g}", "s/image", wall / k, fixed_sec,
                float(evals.mean()) / fwd, higher_is_better=False, baseline_kind="fixed-N CERTIFY",
                limit_kind="its evaluations at the forward rate")


PART_FUNCS: dict[str, Callable[[Ctx], None]] = {
    "smoothing_cifar": part_smoothing_cifar, "smoothing_imagenet": part_smoothing_imagenet, "shadow": part_shadow,
    "interval": part_interval, "train_certify": part_train_certify, "sequential": part_sequential,
    "smoothing_compile": part_smoothing_compile,
}


# ------------------------------------------------------------------------------------ one part

def run_part(args: argparse.Namespace) -> int:
    """Run one part in this process; its results go into ``args.json`` as they come."""
    part = PART_BY_NAME[args.part]
    rec = Recorder(args.json, part.name)
    site = args.data / "site"
    if site.is_dir() and str(site) not in sys.path:
        sys.path.append(str(site))  # after the machine's own packages: staged ones only fill gaps
    missing = [m for m in part.needs if importlib.util.find_spec(m) is None]
    if missing:
        reason = f"skipped: missing Python module(s) {', '.join(missing)} (stage with benchmarks/stage_device_data.py)"
        print(f"[{part.name}] {reason}", flush=True)
        rec.finish("skipped", reason)
        return 0
    import torch

    sizes = SMOKE if args.smoke else FULL
    if args.smoke:  # one intra-op thread: on a shared 2-core machine two OpenMP threads can run 30x slower
        torch.set_num_threads(1)
    if sizes.device == "cuda" and not torch.cuda.is_available():
        rec.finish("skipped", "no CUDA device")
        return 0
    for p in (str(ROOT / "src"),):
        if p not in sys.path:
            sys.path.insert(0, p)
    ctx = Ctx(rec=rec, sizes=sizes, clock=Clock(args.deadline), data=args.data, work=args.work,
              dev=torch.device(sizes.device))
    print(f"[{part.name}] start: {part.title}; {ctx.clock.left():.0f} s", flush=True)
    try:
        PART_FUNCS[part.name](ctx)
    except Skip as exc:
        rec.finish("skipped", str(exc))
        print(f"[{part.name}] skipped: {exc}", flush=True)
        return 0
    except Exception as exc:  # recorded with its traceback; the driver goes on with the next part
        tail = traceback.format_exc()[-3000:]
        rec.finish("failed", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        rec.detail("traceback", tail)
        print(tail, file=sys.stderr, flush=True)
        return 1
    rec.finish("ok")
    return 0


# ------------------------------------------------------------------------------------ the driver

def plan_shares(budget: float, names: list[str]) -> dict[str, float]:
    """Seconds of each selected part: its share of the 480-s plan, scaled to ``budget`` (less the reserve)."""
    required = sum(PART_BY_NAME[n].plan_s for n in names if not PART_BY_NAME[n].optional) or 1.0
    scale = max(budget - RESERVE_S, 1.0) / required
    return {n: PART_BY_NAME[n].plan_s * scale for n in names}


def run_child(cmd: list[str], env: dict, timeout: float, log) -> tuple[int, bool]:
    """Run a part's process (own session), echoing its output to stdout and the log; (exit code, timed out)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1,
                            start_new_session=True, cwd=str(ROOT))

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(timeout, 0.1))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the part and anything it started
        rc = proc.wait()
        timed_out = True
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    reader.join(timeout=5)
    return rc, timed_out


def _children_cpu() -> float:
    import resource

    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def render_markdown(doc: dict) -> str:
    lines = [f"# GPU suite (issue 20): {doc['mode']} run", "",
             f"device: {doc.get('device') or '–'}; torch {doc.get('torch')}; budget {doc['budget_s']:.0f} s; "
             f"started {doc['started']}; finished {doc.get('finished') or '(running)'}; data {doc.get('data')}", "",
             "| part | status | seconds | share (s) | reason |", "| --- | --- | ---: | ---: | --- |"]
    for name, p in doc["parts"].items():
        lines.append(f"| {name} | {p['status']} | {fmt(p.get('seconds'))} | {fmt(p.get('budget_s'))} | "
                     f"{(p.get('reason') or '').replace('|', '/')} |")
    lines += ["", "Ratios: ours/baseline > 1 means ours is better (for s/image and evaluations/image: baseline / ours); "
              "ours/limit is the fraction of the hardware limit reached (limit / ours for times).", "",
              "| part | figure | unit | ours | baseline | ours/baseline | limit | ours/limit | note |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, p in doc["parts"].items():
        for r in p["rows"]:
            cells = [name, r["what"], r["unit"], fmt(r["ours"]), f"{fmt(r['baseline'])} ({r['baseline_kind']})",
                     fmt(r["ours_over_baseline"]), f"{fmt(r['limit'])} ({r['limit_kind']})", fmt(r["ours_over_limit"]),
                     r["note"]]
            lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    acc = doc["parts"].get("train_certify", {}).get("details", {}).get("certified_accuracy")
    if acc:
        lines += ["", "## Certified accuracy (σ = 0.25) next to Cohen et al.'s ResNet-110", "",
                  "| r | " + " | ".join(acc["table"]) + " |", "| --- |" + " ---: |" * len(acc["table"]),
                  "| ours | " + " | ".join(f"{v:.3f}" for v in acc["table"].values()) + " |",
                  "| Cohen et al. | " + " | ".join(f"{v:.2f}" for v in acc["cohen"].values()) + " |", "",
                  acc["gap"]]
    notes = [(n, t) for n, p in doc["parts"].items() for t in p["notes"]]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}: {t}" for n, t in notes]
    return "\n".join(lines) + "\n"


def driver(args: argparse.Namespace) -> int:
    started = time.time()
    deadline = started + args.budget_s
    names = [p.name for p in PARTS] if not args.parts else [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = [n for n in names if n not in PART_BY_NAME]
    if unknown:
        print(f"gpu_suite: unknown part(s) {', '.join(unknown)}; parts: {', '.join(PART_BY_NAME)}", file=sys.stderr)
        return 2
    info: dict[str, Any] = {"python": platform.python_version()}
    if not args.smoke:
        try:
            import torch
        except ImportError:
            print("gpu_suite: PyTorch is not installed here; the full suite needs it and a CUDA device", file=sys.stderr)
            return 2
        if not torch.cuda.is_available():
            print("gpu_suite: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine "
                  "(benchmarks/README.md, 'GPU suite'), or --smoke for the CPU check", file=sys.stderr)
            return 2
        info.update({"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count()})
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    work.mkdir(parents=True, exist_ok=True)
    data = args.data
    if data is None:
        if args.smoke:  # a tiny folder of the staged layout, from random pixels and weights
            sys.path.insert(0, str(BENCH))
            import stage_device_data

            data = stage_device_data.synthetic(work / "data")
        else:
            data = ROOT / ".device"
    data = data.resolve()
    manifest = {}
    if (data / "MANIFEST.json").is_file():
        raw = json.loads((data / "MANIFEST.json").read_text())
        manifest = {k: raw.get(k) for k in ("cifar10", "fashion_mnist_test", "read_back", "total_bytes")}
    shares = plan_shares(args.budget_s, names)
    jpath, mpath = args.out / JSON_NAME, args.out / MD_NAME
    doc = {"suite": "benchmarks/gpu_suite.py (issue 20)", "mode": "smoke" if args.smoke else "full",
           "budget_s": args.budget_s, "started": _dt.datetime.now().isoformat(timespec="seconds"), "finished": None,
           "data": str(data), "data_manifest": manifest, "plan_s": shares, **info,
           "parts": {n: {"name": n, "title": PART_BY_NAME[n].title, "optional": PART_BY_NAME[n].optional,
                         "status": "pending", "reason": None, "budget_s": None, "seconds": None, "rows": [],
                         "details": {}, "notes": []} for n in names}}
    write_doc(jpath, doc)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.smoke:
        env["OMP_NUM_THREADS"] = "1"
    # (the staged site/ is appended to sys.path by each part, *after* the machine's own packages)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    print(f"gpu_suite: {doc['mode']} run, budget {args.budget_s:.0f} s, parts {', '.join(names)}; data {data}; "
          f"out {args.out}", flush=True)
    bad = 0
    carry = 0.0  # seconds earlier parts left unused
    with open(args.out / LOG_NAME, "w", encoding="utf-8") as log:
        for name in names:
            part = PART_BY_NAME[name]
            left = deadline - time.time() - (2.0 if args.smoke else RESERVE_S / 2)
            share = shares[name] + carry
            timeout = min(share, left)
            minimum = 2.0 if args.smoke else part.min_s
            doc = read_doc(jpath)
            entry = doc["parts"][name]
            if part.optional and not args.smoke:
                timeout = left  # only what the others left
            if timeout < minimum:
                why = (f"skipped: budget spent ({max(left, 0):.0f} s of the {args.budget_s:.0f}-s budget left, "
                       f"the part needs at least {minimum:.0f} s)")
                if part.optional:
                    why = f"skipped: optional, runs only in time left over ({max(left, 0):.0f} s left, needs {minimum:.0f} s)"
                entry.update(status="skipped", reason=why, budget_s=0.0)
                write_doc(jpath, doc)
                mpath.write_text(render_markdown(doc), encoding="utf-8")
                print(f"[{name}] {why}", flush=True)
                continue
            entry.update(status="running", budget_s=round(timeout, 1))
            write_doc(jpath, doc)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--json", str(jpath.resolve()),
                   "--data", str(data), "--work", str(work), "--deadline", f"{time.time() + 0.92 * timeout:.3f}"]
            if args.smoke:
                cmd.append("--smoke")
            t0, cpu0 = time.time(), _children_cpu()
            rc, timed_out = run_child(cmd, env, timeout, log)
            spent = time.time() - t0
            jpath.with_name(jpath.name + ".part").unlink(missing_ok=True)  # a write cut by the kill
            if not part.optional:
                carry = max(0.0, share - spent)
            doc = read_doc(jpath)
            entry = doc["parts"][name]
            entry["seconds"] = round(spent, 1)
            entry["cpu_seconds"] = round(_children_cpu() - cpu0, 1)  # on a shared machine: what the part itself used
            if timed_out:
                entry.update(status="timeout", reason=f"killed after its {timeout:.0f}-s share; what it recorded is kept")
            elif entry["status"] == "running":
                entry.update(status="failed", reason=f"the part's process ended with exit code {rc} without a result")
            if entry["status"] in ("failed", "timeout"):
                bad += 1
            write_doc(jpath, doc)
            mpath.write_text(render_markdown(doc), encoding="utf-8")
            print(f"[{name}] {entry['status']} in {spent:.1f} s" + (f": {entry['reason']}" if entry["reason"] else ""),
                  flush=True)
    doc = read_doc(jpath)
    doc["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    doc["seconds"] = round(time.time() - started, 1)
    setups = [p["details"]["setup"] for p in doc["parts"].values() if "setup" in p["details"]]
    doc["device"] = next((st.get("name") or st.get("cpu") for st in setups), None)
    doc["torch"] = doc.get("torch") or next((st.get("torch") for st in setups), None)
    doc["exit_code"] = 1 if bad else 0
    write_doc(jpath, doc)
    md = render_markdown(doc)
    mpath.write_text(md, encoding="utf-8")
    if not args.work and not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + md, flush=True)
    print(f"gpu_suite: {doc['seconds']:.0f} s; {bad} part(s) failed or ran out of time; {jpath}", flush=True)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-suite",
                   help="folder for the JSON, Markdown and log (default runs/gpu-suite, git-ignored)")
    p.add_argument("--data", type=Path, default=None,
                   help="staged folder (default .device; --smoke: a tiny synthetic one in the work folder)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of the whole suite (default 480; smoke 300)")
    p.add_argument("--smoke", action="store_true", help="the same code paths, tiny sizes, on the CPU")
    p.add_argument("--parts", default=None, help=f"comma list of parts to run (default all: {', '.join(PART_BY_NAME)})")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary scratch folder")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run one part in this process
    p.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 300.0 if args.smoke else 480.0  # smoke: a safety net only (it takes < 1 min)
    if args.part:
        if args.part not in PART_BY_NAME or args.json is None or args.deadline is None or args.data is None:
            p.error("--part needs a known part name, --json, --data and --deadline (the driver passes them)")
        args.work = Path(args.work or tempfile.mkdtemp(prefix="gpu_suite_"))
        return run_part(args)
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
