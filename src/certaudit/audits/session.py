"""What every verb does around its own work: open the model and data, run the loop, report progress.

A verb (:mod:`certaudit.audits.jobs`) opens a :class:`Session` (the process group of a
torchrun/accelerate launch, the device, the model checked against the data set, the SHA-256 that
binds result files to the weights), picks its images with :func:`select`, runs its ``work`` through
:func:`Session.run` (the shared loop of :mod:`certaudit.audits.runner` with a progress bar, a
resume notice and a long-run estimate on stderr) and adds :func:`Session.run_fields` to its
summary. Outputs are checked before any work with :func:`check_output`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from certaudit.audits.runner import RunResult, Work, run_rows
from certaudit.data import DatasetInfo, dataset_info, load_dataset, sha256_file
from certaudit.distributed import DistEnv, device_for
from certaudit.distributed import init as dist_init
from certaudit.distributed import shutdown as dist_shutdown
from certaudit.errors import InputError
from certaudit.models import ModelMeta, load_checkpoint, load_factory, resolve_device

err_console = Console(stderr=True)

LONG_RUN_SECONDS = 600.0


def load_model_for_data(model: Any, dataset: str | None, dev: Any,
                        weights: Any = None) -> tuple[torch.nn.Module, ModelMeta, DatasetInfo, str]:
    """The model on ``dev``, its metadata, the data set's description (default: the model's own) and
    the SHA-256 that binds result files to these weights; refuses a data set whose image shape or
    class count the model does not take.

    ``model`` is a certaudit checkpoint, or a factory ``package.module:function`` (the user's own
    architecture: the module is imported, as running the user's script would) whose weights come from
    ``weights``; its input shape and classes are the data set's (``dataset`` is then required)."""
    spec = str(model)
    if weights is not None or (":" in spec and not Path(spec).exists()):
        if not dataset:
            raise InputError("a factory --model needs --dataset (it fixes the input shape and the classes)")
        info = dataset_info(dataset)
        net, meta = load_factory(spec, weights, info.shape, info.num_classes, info.name, dev)
        sha = hashlib.sha256(f"{spec}|{sha256_file(weights)}".encode()).hexdigest()
    else:
        net, meta = load_checkpoint(model, dev)
        info = dataset_info(dataset or meta.dataset)
        sha = sha256_file(model)
    if list(info.shape) != list(meta.input_shape):
        raise InputError(f"model {model} expects inputs {tuple(meta.input_shape)}, data set {info.name} has {info.shape}")
    if info.num_classes != meta.num_classes:
        raise InputError(f"model {model} has {meta.num_classes} classes, data set {info.name} has {info.num_classes}")
    return net, meta, info, sha


def check_output(path: Any, flag: str, *, folder: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: a folder where a file is meant (or
    the reverse), something that is not a regular file (``/dev/full``), a parent that is a file or
    is read-only. Missing parent folders are created."""
    if path is None:
        return
    p = Path(path)
    if p.exists():
        if folder and not p.is_dir():
            raise InputError(f"{flag} {p} exists and is not a folder")
        if not folder and p.is_dir():
            raise InputError(f"{flag} {p} is a folder; give a file name")
        if not folder and not p.is_file():
            raise InputError(f"{flag} {p} is not a regular file")
        if not os.access(p, os.W_OK):
            raise InputError(f"{flag} {p} is not writable")
        return
    anc = p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise InputError(f"{flag} {p}: {anc} is not a folder")
    if not os.access(anc, os.W_OK):
        raise InputError(f"{flag} {p}: the folder {anc} is not writable")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{flag} {p}: cannot create {p.parent} ({exc.strerror})") from None


def check_plot(path: Any, flag: str = "--plot") -> None:
    """A figure output: a writable ``.png`` file."""
    if path is not None and Path(path).suffix.lower() != ".png":
        raise InputError(f"{flag} must name a .png file, got {path}")
    check_output(path, flag)


def progress_bar(enabled: bool) -> Progress:
    """A transient rich progress bar on stderr (disabled: a no-op with the same interface)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err_console, transient=True, disable=not enabled)


def say_if_long(enabled: bool) -> Callable[[float, int], None]:
    """An ``estimate`` callback for the run loop: one stderr line when the rest of a run is projected
    to take more than :data:`LONG_RUN_SECONDS` (rerunning resumes, so stopping loses little)."""
    def estimate(seconds: float, images: int) -> None:
        if enabled and seconds > LONG_RUN_SECONDS:
            hours = seconds / 3600
            when = f"{hours:.1f} h" if hours >= 1 else f"{seconds / 60:.0f} min"
            err_console.print(f"expected time for the remaining {images} images: about {when} on this machine "
                              "(Ctrl-C stops; rerunning the same command resumes)")
    return estimate


def check_range(limit: int | None, skip: int, stride: int = 1) -> None:
    """The image-range options, checked before anything is loaded."""
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if skip < 0:
        raise InputError(f"--skip must be >= 0, got {skip}")
    if stride < 1:
        raise InputError(f"--stride must be >= 1, got {stride}")


@dataclass
class Session:
    """One verb's process: the launch, the device, the model and its data set."""

    env: DistEnv
    device: torch.device
    net: torch.nn.Module
    meta: ModelMeta
    info: DatasetInfo
    model_sha: str
    quiet: bool = False  # no progress bar, no notices (machine output, or not rank 0)

    @classmethod
    def open(cls, model: Any, *, weights: Any = None, dataset: str | None = None, device: str = "auto",
             quiet: bool = False) -> "Session":
        env = dist_init()  # rank 0 of 1 unless launched by torchrun / accelerate
        dev = device_for(env, resolve_device(device))
        net, meta, info, sha = load_model_for_data(model, dataset, dev, weights)
        return cls(env=env, device=dev, net=net, meta=meta, info=info, model_sha=sha,
                   quiet=quiet or not env.is_main)

    def data(self, split: str, data_root: Any, *, skip: int = 0, limit: int | None = None,
             stride: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The split's images and labels and the selected indices ``skip, skip + stride, ...`` (at most ``limit``)."""
        x, y = load_dataset(self.info.name, split, data_root)
        if skip >= len(y):
            raise InputError(f"--skip {skip} is past the end of {self.info.name} {split} ({len(y)} images)")
        wanted = list(range(skip, len(y), stride))
        return x, y, (wanted if limit is None else wanted[:limit])

    def run(self, work: Work, wanted: list[int], *, out: Any, config: dict[str, Any], block: int, label: str,
            done_noun: str, steps_per_image: int = 1) -> RunResult:
        """The shared run loop with a progress bar (in images, or ``steps_per_image`` units per image),
        a resume notice and a long-run estimate; then the process group is closed."""
        with progress_bar(enabled=not self.quiet) as bar:
            task = bar.add_task(label, total=None)
            self.advance = lambda k: bar.advance(task, k)  # finer progress from inside a block
            run = run_rows(work, wanted, out=out, config=config, env=self.env, block=block,
                           progress=lambda done, total: bar.update(task, completed=done * steps_per_image,
                                                                   total=max(1, total * steps_per_image)),
                           estimate=say_if_long(not self.quiet),
                           announce=None if self.quiet else lambda k: err_console.print(
                               f"resuming {out}: {k} of {len(wanted)} images already {done_noun}"))
        self.close()
        return run

    def close(self) -> None:
        """Leave the process group of a multi-process launch (nothing to do in a single process)."""
        dist_shutdown(self.env)

    def advance(self, k: int) -> None:  # replaced by the running bar
        return None

    def run_fields(self, run: RunResult, out: Any) -> dict[str, Any]:
        """What every summary says about the run itself."""
        fields: dict[str, Any] = {"device": str(self.device), "new_images": run.new_images,
                                  "wall_seconds": round(run.wall_seconds, 3)}
        if self.env.distributed:
            fields["processes"] = self.env.world_size
        if run.new_images and run.wall_seconds > 0:
            fields["images_per_second_this_run"] = run.new_images / run.wall_seconds
        if out is not None:
            fields["out"] = str(out)
        return fields


__all__ = ["LONG_RUN_SECONDS", "Session", "check_output", "check_plot", "check_range", "err_console",
           "load_model_for_data", "progress_bar", "say_if_long"]
