"""Model level: RepLKNet-31B images/s for inference (fp32 and bf16 autocast, NCHW and channels_last, before and after
the merge) and for an AMP bf16 training step, lkconv against the same model on plain PyTorch convs."""

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import lkconv
from lkconv.models import create_model

from .op_suite import LAYOUTS
from .formatting import number, ratio
from .progress import Progress
from .timing import Budget, failure, measure, release_memory, set_fp32_math

MODES = ("inference", "train")
PRECISIONS = ("fp32", "bf16")  # bf16: torch.autocast with bfloat16; the weights stay fp32
FORMS = ("unmerged", "merged")  # merged: lkconv.reparameterize_model, the deployment form
IMPLS = ("lkconv", "pytorch")  # pytorch: lkconv.revert of the same model, every DepthwiseConv2d back to nn.Conv2d
TRAINING_STEP = ("one SGD step (lr 1e-3, momentum 0.9) on cross-entropy against random labels: zero_grad, forward "
                 "under bf16 autocast, backward, optimizer.step; model.train(), unmerged form only")


@dataclass
class ModelSettings:
    """What to measure; the defaults are RepLKNet-31B at the issue's resolutions, sized for an 80 GB GPU."""

    model: str = "replknet_31b"
    resolutions: tuple[int, ...] = (224, 384)
    batches: dict[int, int] = field(default_factory=lambda: {224: 64, 384: 32})  # batch per resolution
    modes: tuple[str, ...] = MODES
    precisions: tuple[str, ...] = PRECISIONS  # inference only: training is always AMP bf16
    layouts: tuple[str, ...] = tuple(LAYOUTS)
    forms: tuple[str, ...] = FORMS  # inference only: training runs the unmerged form
    model_overrides: dict = field(default_factory=dict)  # create_model kwargs, e.g. tiny widths for a CPU run
    tf32: bool = False
    budget: Budget = Budget()

    def __post_init__(self) -> None:
        """Rejects a bad setting before the run starts, not hours into it."""
        for name, allowed in (("modes", MODES), ("precisions", PRECISIONS), ("layouts", tuple(LAYOUTS)),
                              ("forms", FORMS)):
            if unknown := [value for value in getattr(self, name) if value not in allowed]:
                raise ValueError(f"{name} must be among {allowed}; got {unknown}")
        if missing := [resolution for resolution in self.resolutions if resolution not in self.batches]:
            raise ValueError(f"batches must give a batch size for every resolution; missing {missing}")

    def cases(self) -> list[tuple[str, str, str, str]]:
        """(mode, layout, precision, form) of every measurement pair, grouped by layout to convert the models less."""
        cases = []
        if "inference" in self.modes:
            cases += [("inference", layout, precision, form)
                      for layout in self.layouts for precision in self.precisions for form in self.forms]
        if "train" in self.modes:
            cases += [("train", layout, "bf16", "unmerged") for layout in self.layouts]
        return cases

    def measurements(self) -> int:
        return len(self.resolutions) * len(self.cases()) * len(IMPLS)

    def label(self) -> str:
        """The model's name as results show it, with any create_model overrides: a CPU run's toy-sized model is not
        RepLKNet-31B."""
        if not self.model_overrides:
            return self.model
        return f"{self.model} ({', '.join(f'{k}={v}' for k, v in self.model_overrides.items())})"


def build_models(settings: ModelSettings, device: torch.device) -> dict[tuple[str, str], nn.Module]:
    """Each (form, impl) the settings need; the PyTorch twins are deep copies with the same weights."""
    model = create_model(settings.model, **{"device": device, **settings.model_overrides})
    models = {("unmerged", "lkconv"): model, ("unmerged", "pytorch"): lkconv.revert(model)}
    if "inference" in settings.modes and "merged" in settings.forms:
        # Merged from the untrained model: the training cases later change its weights and BatchNorm statistics.
        merged = lkconv.reparameterize_model(model.eval())
        models.update({("merged", "lkconv"): merged, ("merged", "pytorch"): lkconv.revert(merged)})
    return models


def model_call(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mode: str, precision: str) -> Callable:
    """The timed call: one forward under inference_mode, or one training step (TRAINING_STEP)."""
    device_type = images.device.type
    if mode == "inference":
        model.eval()

        def infer():
            with torch.inference_mode(), torch.autocast(device_type, torch.bfloat16, enabled=precision == "bf16"):
                return model(images)

        return infer
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    return step


def _measured(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mode: str, precision: str,
              layout: str, budget: Budget) -> dict:
    """The timing of one case, or the error it raised (e.g. out of memory); a run never stops at one failure."""
    try:
        memory_format = LAYOUTS[layout]
        model.to(memory_format=memory_format)
        timing = measure(model_call(model, images.contiguous(memory_format=memory_format), labels, mode, precision),
                         budget)
    except Exception as error:  # noqa: BLE001 - reported in the row
        fields = failure(error)
    else:
        fields = {**timing._asdict(), "error": ""}
    finally:
        model.zero_grad(set_to_none=True)  # a training step's gradients would otherwise stay for the next case
    if fields["error"]:
        release_memory()  # here, once the traceback no longer holds the failed call's tensors
    return fields


def _resolution_rows(settings: ModelSettings, resolution: int, device: torch.device,
                     progress: Progress) -> list[dict]:
    """Every case at one resolution on one set of models, built once and moved between layouts."""
    batch = settings.batches[resolution]
    models, setup_failure = {}, {}
    try:
        models = build_models(settings, device)
        images = torch.randn(batch, settings.model_overrides.get("in_chans", 3), resolution, resolution,
                             device=device)
        labels = torch.randint(settings.model_overrides.get("num_classes", 1000), (batch,), device=device)
    except Exception as error:  # noqa: BLE001 - e.g. out of memory; every row of this resolution reports it
        setup_failure = failure(error)
    if setup_failure:
        release_memory()
    rows = []
    for mode, layout, precision, form in settings.cases():
        for impl in IMPLS:
            progress.update(f"model {settings.label()} {resolution}px batch {batch} {mode} {precision} {layout} "
                            f"{form} {impl}")
            row = {"suite": "model", "model": settings.label(), "resolution": resolution, "batch": batch, "mode": mode,
                   "precision": precision, "layout": layout, "form": form, "impl": impl}
            row.update(setup_failure or _measured(models[form, impl], images, labels, mode, precision, layout,
                                                  settings.budget))
            median = row["median_ms"]
            row["images_per_s"] = batch / (median * 1e-3) if median else None
            rows.append(row)
            progress.advance()
    return rows


def run(settings: ModelSettings, progress: Progress) -> list[dict]:
    """One row per (resolution, mode, layout, precision, form, impl), speed-ups filled in; a failure becomes its
    row's error. Sets the process-wide fp32 rule to `settings.tf32` first, for both impls alike."""
    set_fp32_math(settings.tf32)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for resolution in settings.resolutions:
        rows += _resolution_rows(settings, resolution, device, progress)
        release_memory()  # the models and activations of this resolution are gone; give their blocks back
    add_speedups(rows)
    return rows


def _case_key(row: dict) -> tuple:
    return tuple(row[name] for name in ("model", "resolution", "batch", "mode", "precision", "layout", "form"))


def add_speedups(rows: list[dict]) -> None:
    """lkconv's speed-up over the PyTorch twin in the same case (>1: faster); PyTorch rows get 1 against themselves."""
    baseline = {_case_key(row): row["median_ms"] for row in rows if row["impl"] == "pytorch"}
    for row in rows:
        reference, own = baseline.get(_case_key(row)), row["median_ms"]
        row["speedup_vs_pytorch"] = reference / own if reference and own else None


def notes(settings: ModelSettings) -> dict:
    """How the model suite measures, for the results' provenance."""
    return {
        "model_baseline": "the same model after lkconv.revert: each lkconv.DepthwiseConv2d as nn.Conv2d, same weights",
        "model_training_step": TRAINING_STEP,
        "model_fp32_math": "tf32 allowed" if settings.tf32 else "exact (ieee)",
        "model": settings.label(),
    }




def summary_table(rows: list[dict]) -> str:
    """Markdown: per case, images/s of lkconv and of PyTorch, the speed-up and each one's peak memory."""
    rows = [row for row in rows if row.get("suite") == "model"]
    by_case = {}
    for row in rows:
        by_case.setdefault(_case_key(row), {})[row["impl"]] = row
    lines = [
        "| model | resolution | batch | mode | precision | layout | form | lkconv (images/s) | PyTorch (images/s) "
        "| speed-up | lkconv peak (MiB) | PyTorch peak (MiB) |",
        "|---|---:|---:|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, impls in by_case.items():
        ours, theirs = impls.get("lkconv", {}), impls.get("pytorch", {})
        speedup = ours.get("speedup_vs_pytorch")
        lines.append("| " + " | ".join([
            *map(str, key), number(ours.get("images_per_s"), 1), number(theirs.get("images_per_s"), 1),
            ratio(speedup), number(ours.get("peak_memory_mib")),
            number(theirs.get("peak_memory_mib")),
        ]) + " |")
    lines += ["", f"lkconv against the same model on plain PyTorch convs (lkconv.revert). bf16 = autocast. "
                  f"Training: {TRAINING_STEP}. Peak memory: what one call allocates above what is live before it "
                  "(the models and their inputs; in training also the gradients the step before left, which the "
                  "step frees and makes again), GPU only."]
    if failed := sum(1 for row in rows if row.get("error")):
        lines.append(f"{failed} of {len(rows)} measurements failed (—); the error column of the CSV says why.")
    return "\n".join(lines)
