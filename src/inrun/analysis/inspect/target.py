"""``inrun inspect``: which parameters each route values, and the extra memory it predicts.

Two kinds of target:

* a run config (``.toml``): the model is built as the run would build it (LoRA included), one
  tiny tracked step runs on two training examples against the run's validation set, and
  :meth:`InRunShapley.coverage` reports the route that actually valued every trainable
  parameter; layer shapes are recorded during that step;
* a Hugging Face model type (``gpt2``, ``llama``...) with its default sizes: built on the
  ``meta`` device (no memory, no download), routes predicted from the layer registry
  (:func:`inrun.layers.handler_for`) the way the tracker chooses them.

Predicted extra memory (beyond ordinary training) per step, for batch ``B`` and ``N``
validation tokens:

* the validation gradient ``g_val``: one gradient-sized buffer of the trainable parameters;
* Gram-route layers keep the validation factors ``A_val [N, d]`` and ``D_val [N, p]``;
* order 2 (and optimizers whose rule is element-wise) keep each tracked layer's per-example
  inputs and output gradients until the step's values are final;
* the per-example dot products ``[params, B]`` in float64 (small);
* the largest transient of the vector route, ``[B, T, min(d, p)]``, during backward.

It is an estimate from shapes (allocator overheads and framework buffers are not counted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn

from ...run.config import ConfigError, load_config, saved_config
from ...run.data import load_data
from ...run.hf_config import check_model_config
from ...run.models import build_model, build_optimizer, loss_function
from ...store.rundir import RunDir, RunDirError
from ...store.writer import read_tracker_info
from ...tracker import InRunShapley
from ...tracking.config import TrackerConfig
from ...tracking.coverage import coverage_of
from ...tracking.entries import build_entries
from ...tracking.params import ParamTable
from ...tracking.routes import RoutePolicy


@dataclass
class ModuleInfo:
    """One module with trainable parameters, as the estimate sees it."""

    name: str
    type: str
    route: str
    params: list[str]
    numel: int
    d_in: int = 0
    d_out: int = 0
    tokens: int = 1  # positions per example (tokens, pixels)


@dataclass
class InspectReport:
    """The result of :func:`inspect_target`; :meth:`print` renders it."""

    title: str
    total_params: int
    trainable_params: int
    frozen_params: int
    routes: dict[str, list[str]]
    numel: dict[str, int]
    modules: list[ModuleInfo]
    memory: list[tuple[str, int]]
    param_bytes: int
    settings: str
    notes: list[str] = field(default_factory=list)

    @property
    def valued_params(self) -> list[str]:
        """Names of every parameter that gets valued (all trainable ones)."""
        return [n for names in self.routes.values() for n in names]

    @property
    def extra_bytes(self) -> int:
        return sum(b for _, b in self.memory)

    def print(self, console: Console, modules: bool = False) -> None:
        console.print(f"[bold]{escape(self.title)}[/]")
        share = self.trainable_params / max(self.total_params, 1)
        console.print(
            f"{self.total_params:,} parameters: {self.trainable_params:,} trainable ({share:.1%}) are "
            f"valued; {self.frozen_params:,} frozen are not."
        )
        table = Table(title="Routes", title_justify="left")
        for col in ("route", "parameters", "elements", "share"):
            table.add_column(col, justify="left" if col == "route" else "right")
        total = sum(self.numel.values()) or 1
        for route in sorted(self.routes):
            table.add_row(route, str(len(self.routes[route])), f"{self.numel[route]:,}", f"{self.numel[route] / total:.1%}")
        console.print(table)
        if modules or len(self.modules) <= 12 or self.frozen_params:
            table = Table(title="Valued modules", title_justify="left")
            for col in ("module", "type", "route", "parameters", "elements"):
                table.add_column(col, justify="right" if col == "elements" else "left", overflow="fold")
            for m in self.modules:
                table.add_row(escape(m.name), m.type, m.route, escape(", ".join(m.params)), f"{m.numel:,}")
            console.print(table)
        table = Table(title=f"Predicted extra memory ({self.settings})", title_justify="left")
        table.add_column("component")
        table.add_column("size", justify="right")
        for name, size in self.memory:
            table.add_row(name, _fmt_bytes(size))
        table.add_row("[bold]total[/]", f"[bold]{_fmt_bytes(self.extra_bytes)}[/]")
        console.print(table)
        console.print(
            f"Parameters and their gradients take {_fmt_bytes(self.param_bytes)}; the estimate is "
            f"{self.extra_bytes / max(self.param_bytes, 1):.0%} of that."
        )
        for note in self.notes:
            console.print(f"[dim]{escape(note)}[/]")


def inspect_target(
    target: str,
    overrides: Sequence[str] = (),
    batch_size: int | None = None,
    length: int | None = None,
    val_tokens: int | None = None,
    order: int | None = None,
) -> InspectReport:
    """Inspect a run config (path ending in ``.toml``), a run directory, or a Hugging Face model type."""
    if Path(target).is_dir():
        if overrides:
            raise ConfigError("--set", "overrides apply to a config file, not to a run directory")
        return inspect_run_dir(target)
    if target.endswith(".toml") or Path(target).is_file():
        return inspect_config(load_config(target, overrides), batch_size=batch_size, order=order)
    if overrides:
        raise ConfigError("--set", "overrides apply to a config file, not to a model type")
    return inspect_model_type(target, batch_size=batch_size or 16, length=length or 128,
                              val_tokens=val_tokens or 1024, order=order or 1)


def inspect_config(config: Any, batch_size: int | None = None, order: int | None = None) -> InspectReport:
    """Build the run's model, value one tiny step, and report coverage and memory."""
    import dataclasses

    if order is not None:
        config = config.replace(values=dataclasses.replace(config.values, order=order))
    check_model_config(config)  # hf_config keys and values, as a run checks them
    train_set, val_set = load_data(config)
    torch.manual_seed(config.seed)
    model = build_model(config.model, train_set)
    model.train()
    optimizer = build_optimizer(config.optimizer, model)
    loss_fn = loss_function(train_set)
    dtype = next(model.parameters()).dtype
    vx, vy = val_set.inputs, val_set.targets
    if vx.is_floating_point():
        vx = vx.to(dtype)
    v = config.values
    tracker = InRunShapley(
        model, optimizer, val_loss=lambda m: loss_fn(m, vx, vy), order=v.order,
        second_order=v.second_order, route=v.route, check=v.check,
    )
    tiny = 2
    shapes, handles = _record_shapes(model, tiny)
    x, y = train_set.inputs[:tiny], train_set.targets[:tiny]
    if x.is_floating_point():
        x = x.to(dtype)
    try:
        with tracker.step(train_set.ids[:tiny]):
            loss_fn(model, x, y).backward()
        optimizer.step()
        coverage = tracker.coverage()
        deferred = _kept_because(v.order, tracker.value_rule.keeps_factors)
    finally:
        for h in handles:
            h.remove()
        tracker.close()
    modules = _module_infos(model, coverage, shapes)
    B = batch_size or config.training.batch_size
    n_val = int((val_set.targets != -100).sum()) if val_set.task == "lm" else len(val_set)
    settings = f"batch {B}, {n_val:,} validation tokens, order {v.order}"
    kind = config.model.hf_type or config.model.kind
    title = f"{type(model).__name__} ({kind}{' + LoRA' if config.model.lora else ''}) as the run config builds it"
    report = _report(title, model, coverage.routes,
                     coverage.numel, modules, B, n_val, deferred, settings)
    if config.model.lora is not None:
        report.notes.append("LoRA: the base model is frozen; only the adapter parameters are valued.")
    return report


def _module_infos(model: nn.Module, coverage: Any, shapes: dict[str, tuple[int, int, int]]) -> list[ModuleInfo]:
    """Each module with trainable parameters: the route(s) that valued them (at a site, if the
    verification moved them there) and its recorded shapes."""
    route_of = {p: r for r, names in coverage.routes.items() for p in names}
    modules = []
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        full = [f"{name}.{n}" if name else n for n, _ in own]
        routes = sorted({route_of.get(f, "not reached") for f in full})
        sites = sorted({m for f in full for m in coverage.valued_at.get(f, []) if m.endswith("(site)")})
        if sites:
            routes = [f"{'+'.join(routes)} at {', '.join(sites)}"]
        d_in, d_out, tokens = shapes.get(name, (0, 0, 1))
        modules.append(ModuleInfo(name or type(module).__name__, type(module).__name__, "+".join(routes),
                                  [n for n, _ in own], sum(p.numel() for _, p in own), d_in, d_out, tokens))
    return modules


def _record_shapes(model: nn.Module, batch: int) -> tuple[dict[str, tuple[int, int, int]], list[Any]]:
    """``(shapes, hooks)``: each valued module's ``(d_in, d_out, tokens per example)``, filled by
    forward hooks at its first call on a batch of ``batch`` examples (remove the hooks after)."""
    shapes: dict[str, tuple[int, int, int]] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if isinstance(output, torch.Tensor) and x is not None and name not in shapes:
                d_out = output.shape[-1] if output.dim() > 1 else 1
                d_in = x.shape[-1] if x.dim() > 1 and x.is_floating_point() else d_out
                tokens = max(1, output.numel() // max(1, batch * d_out))
                shapes[name] = (int(d_in), int(d_out), int(tokens))

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules()
               if any(p.requires_grad for p in module.parameters(recurse=False))]
    return shapes, handles


def inspect_model_type(model_type: str, batch_size: int, length: int, val_tokens: int, order: int) -> InspectReport:
    """Predict routes and memory for a Hugging Face model type at its default sizes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.for_model(model_type)
    except (KeyError, ValueError):
        raise ConfigError(
            "MODEL_OR_CONFIG", f"{model_type!r} is neither a .toml config nor a model type transformers knows"
        ) from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    table = ParamTable(model)
    entries = build_entries(model, table)
    policy = RoutePolicy(TrackerConfig(order=order))
    coverage = coverage_of(entries, table, lambda e: policy.predict(e, val_tokens))
    modules = []
    for e in entries:
        d_in, d_out = e.handler.feature_sizes(e.module)
        modules.append(ModuleInfo(e.name, type(e.module).__name__, policy.predict(e, val_tokens), list(e.paths),
                                  sum(table.params[i].numel() for i in e.param_index), d_in, d_out, length))
    routes, numel = coverage.routes, coverage.numel
    settings = f"batch {batch_size}, {length} tokens per example, {val_tokens:,} validation tokens, order {order}"
    report = _report(f"{type(model).__name__} ({model_type}, default sizes)", model, routes, numel, modules,
                     batch_size, val_tokens, "order 2" if order == 2 else None, settings)
    report.notes.append("Predicted from the layer registry on the meta device; inspect a run config for the routes of a real step.")
    return report


def _kept_because(order: int, keeps_factors: bool) -> str | None:
    """Why a config keeps per-example factors until the step's values are final (or ``None``)."""
    if order == 2:
        return "order 2"
    if keeps_factors:
        return "order 1 under Adam: its per-coordinate step is known only at optimizer.step()"
    return None


def inspect_run_dir(path: str | Path) -> InspectReport:
    """What a run directory recorded: the route of every parameter, the valued modules and the
    settings (``tracker.json``); a run of ``inrun train`` without it is inspected from its config."""
    rd = RunDir(path)
    meta = rd.meta()
    info = read_tracker_info(rd)
    if info is None:
        if rd.rerunnable:
            return inspect_config(saved_config(rd)[0])

        raise RunDirError(f"{rd.path} has no tracker.json (it is written at the first checkpoint and at the end)")
    cfg = info["config"]
    params = info["parameters"]
    modules = [ModuleInfo(m["name"], m["type"], m["route"], list(m["params"]), int(m["numel"]), int(m["d_in"]), int(m["d_out"]))
               for m in info["modules"]]
    element = int(params["element_size"])
    memory = [("validation gradient g_val", int(params["trainable"]) * element)]
    notes = [f"Recorded by {meta.get('kind', 'cli')} at step {info['step_count']}: the routes that valued each parameter."]
    reason = _kept_because(int(cfg["order"]), bool(info["keeps_factors"]))
    if rd.rerunnable:  # a run of inrun train: its config predicts what `inspect config.toml` predicts
        memory = inspect_config(saved_config(rd)[0]).memory
    elif reason is not None:
        notes.append(f"Each tracked layer's per-example inputs and output gradients are kept until the step's "
                     f"values are final ({reason}); their size depends on the batch: inspect the model's config "
                     "or type for an estimate.")
    cost = info.get("cost") or {}
    if cost.get("steps"):
        notes.append(f"Validation pass: {cost['validation_seconds'] / cost['steps'] * 1e3:.1f} ms per step, "
                     f"{cost['ratio']:.2f}x the forward and backward in tracker.step (measured over {cost['steps']} steps).")
    settings = f"order {cfg['order']}, {info['optimizer']} ({info['rule']})"
    title = f"{meta.get('model', {}).get('class', 'model')} as run {rd.path.name} valued it"
    return InspectReport(
        title=title, total_params=int(params["total"]), trainable_params=int(params["trainable"]),
        frozen_params=int(params["frozen"]), routes=info["coverage"]["routes"],
        numel={k: int(v) for k, v in info["coverage"]["numel"].items()}, modules=modules, memory=memory,
        param_bytes=(int(params["total"]) + int(params["trainable"])) * element, settings=settings, notes=notes,
    )


def _report(
    title: str, model: nn.Module, routes: dict[str, list[str]], numel: dict[str, int], modules: list[ModuleInfo],
    batch: int, val_tokens: int, deferred: str | None, settings: str,
) -> InspectReport:
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    elem = next(iter(unique.values())).element_size() if unique else 4
    n_tensors = sum(1 for p in unique.values() if p.requires_grad)
    memory = [("validation gradient g_val", trainable * elem)]
    gram = sum(val_tokens * (m.d_in + m.d_out) * elem for m in modules if m.route == "gram")
    if gram:
        memory.append(("Gram route: validation factors A_val, D_val", gram))
    if deferred:
        kept = sum(batch * m.tokens * (m.d_in + m.d_out) * elem for m in modules)
        memory.append((f"kept per-example inputs and output gradients ({deferred})", kept))
    memory.append(("per-example dot products (float64)", n_tensors * batch * 8))
    vector = [batch * m.tokens * min(m.d_in, m.d_out) * elem for m in modules if m.route.startswith("vector:") and m.d_in]
    if vector:
        memory.append(("vector route: largest transient", max(vector)))
    return InspectReport(
        title=title, total_params=total, trainable_params=trainable, frozen_params=total - trainable,
        routes=routes, numel=numel, modules=modules, memory=memory,
        param_bytes=(total + trainable) * elem, settings=settings,
    )


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
