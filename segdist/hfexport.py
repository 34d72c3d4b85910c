"""A trained model as a folder others load without segdist:
`launch/export.py RECIPE --checkpoint RUN --format hf --out DIR`.

The model comes back through `segdist.predict.load_predictor` (EMA weights when the checkpoint has
them). An smp architecture is written by smp's own `save_pretrained` (config.json with
`_model_class`, model.safetensors), so `segmentation_models_pytorch.from_pretrained(DIR)` loads
it. Our UNet and SegNet get config.json (`architecture` and the constructor's arguments),
model.safetensors and `modeling_segdist.py`: their source, cut from segdist/models, with a
`from_pretrained(folder)` that needs torch and safetensors alone. Beside them: the model card
README.md and segdist.json (segdist.modelcard).

Before the folder is renamed into place it is loaded back the way the card says and its logits
compared with the checkpoint's model on a random input. `DIR` must be new or empty: anything in it
is refused, never overwritten, and the folder appears whole or not at all (segdist.fileio.atomic_folder).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import inspect
import io
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from segdist.data.sample import padded_size
from segdist.errors import UserError, one_line
from segdist.modelcard import SUMMARY_FILE, MODELING_FILE, CardFacts, SplitFacts, facts_json, render

MAX_ABS_DIFF = 1e-6
"""Largest |loaded - checkpoint's model| logit difference accepted (the same code and weights: 0 is expected)."""


@dataclass
class HfExportResult:
    path: Path
    smp: bool
    ema: bool
    files: list[str]
    max_abs_diff: float
    """|the folder's model - the checkpoint's model| on a random input, in this process."""
    gaps: list[str]
    """What the card could not say, and why."""


def export_hf(recipe, checkpoint: str, out: str) -> HfExportResult:
    """Write the folder; see the module's docstring."""
    from segdist.fileio import atomic_folder, check_new_folder
    from segdist.models.build import OURS
    from segdist.predict import load_predictor

    check_new_folder(out, "--out")
    predictor = load_predictor(recipe, checkpoint, device="cpu")
    model, smp = predictor.model, recipe.model.arch not in OURS
    facts = gather_facts(recipe, predictor, smp)
    size = padded_size(*map(int, recipe.data.crop))
    with atomic_folder(out, "--out") as tmp:
        (tmp / "README.md").write_text(render(facts), encoding="utf-8")  # save_pretrained keeps a README that is there
        (tmp / SUMMARY_FILE).write_text(json.dumps(facts_json(facts), indent=1) + "\n", encoding="utf-8")
        if smp:
            with contextlib.redirect_stdout(io.StringIO()):
                model.save_pretrained(tmp)
        else:
            write_own(tmp, model, facts.config)
        diff = check_loads(tmp, model, smp, size, recipe.model.in_channels)
        files = sorted(p.name for p in tmp.iterdir())
    gaps = [f"{what}: {why}" for what, why in (("training data", facts.train), ("val data", facts.val))
            if isinstance(why, str)]
    if facts.evaluation is None:
        gaps.append(f"val metrics: {facts.no_evaluation}")
    return HfExportResult(Path(out), smp, predictor.ema, files, diff, gaps)


def gather_facts(recipe, predictor, smp: bool) -> CardFacts:
    """What the card says, from the recipe, the loaded model, the manifests and the run folder."""
    from segdist.checkpoint import run_folder, saved_state, saved_step
    from segdist.recipe import dumps_toml
    from segdist.train.state import last_evaluation

    path = predictor.checkpoint
    run, step = run_folder(path), saved_step(path)
    evaluation, no_evaluation = None, ""
    if run is None:
        no_evaluation = f"checkpoint {path.name} lies outside a run folder, which keeps the evaluations in metrics/"
    elif step is None:
        no_evaluation = f"checkpoint {path.name} records no step (state.json)"
    else:
        evaluation = last_evaluation(run, step)
        if evaluation is None:
            no_evaluation = f"run {run.name} kept no evaluation at or before step {step} in metrics/"
    saved_recipe = path / "recipe.toml"
    trained = saved_state(path).get("manifests") or {}  # the manifests training read (absent before they were recorded)
    return CardFacts(
        smp=smp, arch=recipe.model.arch, encoder=recipe.model.encoder if smp else None,
        config=model_config(predictor.model, recipe, predictor.outputs, smp), outputs=predictor.outputs,
        classes=predictor.classes, palette=predictor.palette, ignore_index=predictor.ignore_index, ema=predictor.ema,
        checkpoint=f"{run.name}/checkpoints/{path.name}" if run is not None else path.name, step=step,
        train=split_facts(recipe.data, recipe.data.train_split, False, trained.get("train")),
        val=split_facts(recipe.data, recipe.data.val_split, True, trained.get("val")),
        evaluation=evaluation, no_evaluation=no_evaluation, eval_mode=predictor.mode.describe(),
        whole_frames=predictor.mode.mode == "whole" and not predictor.mode.tta,
        recipe_toml=saved_recipe.read_text(encoding="utf-8") if saved_recipe.is_file() else dumps_toml(recipe),
    )


def split_facts(data, split: str, evaluation: bool, trained: str | None) -> SplitFacts | str:
    """The split's manifest facts, or why they are not known (the data is not on this machine).
    `trained`: the sha256 of the manifest training read, as the checkpoint recorded it (None in
    checkpoints from before it was); the card names that one, and says so where the manifest at the
    recipe's root has changed since."""
    from segdist.data.manifest import load_split, manifest_name

    try:
        m = load_split(data, split, check_files=False, evaluation=evaluation)
    except UserError as exc:
        why = one_line(exc)  # "manifest <path> not found: ...", "data root <path> does not exist: ..."
        return why if trained is None else f"{why}; training read a manifest {manifest_name(split)} of sha256 {trained}"
    return SplitFacts(m.dataset, m.split, m.num_samples, manifest_name(split), trained or m.sha256,
                      None if trained in (None, m.sha256) else m.sha256)


def model_config(model: nn.Module, recipe, outputs: int, smp: bool) -> dict:
    """config.json: smp's own (the hub mixin's record of the constructor's arguments, encoder
    weights none: the weights are in the folder), or our architecture's name and arguments."""
    if smp:
        return {k: v for k, v in model.config.items() if not k.startswith("_")}
    from segdist.models.build import OURS, keyword_defaults

    return {"architecture": recipe.model.arch, "in_channels": recipe.model.in_channels, "classes": outputs,
            **keyword_defaults(OURS[recipe.model.arch]), **recipe.model.arch_args}


def write_own(folder: Path, model: nn.Module, config: dict) -> None:
    """config.json, model.safetensors and modeling_segdist.py of our own architecture."""
    from safetensors.torch import save_file

    (folder / "config.json").write_text(json.dumps(config, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / MODELING_FILE).write_text(modeling_source(), encoding="utf-8")


def modeling_source() -> str:
    """modeling_segdist.py: the modules of our architectures (segdist.models.build.OURS) without their
    docstrings and segdist imports (the names they import are defined in the file), then
    `ARCHITECTURES` and `from_pretrained`. A module importing from segdist beyond these is a bug
    here, not a user's error."""
    from segdist.models.build import OURS

    modules = list(dict.fromkeys(inspect.getmodule(cls) for cls in OURS.values()))
    bundled = {m.__name__ for m in modules}
    defined: dict[str, str] = {}
    parts = ['"""segdist\'s own segmentation architectures, cut from segdist/models for a folder exported with\n'
             "`launch/export.py --format hf`: `from_pretrained(folder)` builds the model config.json names and loads\n"
             'model.safetensors. Needs torch and safetensors, not segdist."""\n\nfrom __future__ import annotations\n']
    for module in modules:
        source = inspect.getsource(module)
        tree = ast.parse(source)
        drop: set[int] = set()
        for i, node in enumerate(tree.body):
            docstring = i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            future = isinstance(node, ast.ImportFrom) and node.module == "__future__"
            ours = isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "segdist"
            if ours and node.module not in bundled:
                raise RuntimeError(f"{module.__name__} imports {node.module}, which {MODELING_FILE} does not hold")
            if docstring or future or ours:
                drop.update(range(node.lineno, node.end_lineno + 1))
            for name in _top_level_names(node):
                if defined.setdefault(name, module.__name__) != module.__name__:
                    raise RuntimeError(f"{name} is defined in {defined[name]} and {module.__name__}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno not in drop:
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if any(n.split(".")[0] == "segdist" for n in names):
                    raise RuntimeError(f"{module.__name__} imports segdist inside a function (line {node.lineno})")
        kept = [line for n, line in enumerate(source.splitlines(), 1) if n not in drop]
        parts.append(f"# ---- {module.__name__} " + "-" * 60 + "\n\n" + "\n".join(kept).strip() + "\n")
    table = ", ".join(f"{json.dumps(name)}: {cls.__name__}" for name, cls in OURS.items())
    parts.append(f"# ---- loading {'-' * 60}\n\nARCHITECTURES = {{{table}}}\n" + '''

def from_pretrained(folder, map_location="cpu"):
    """The model of an exported folder, in eval mode: config.json names the architecture and its
    arguments, model.safetensors holds the weights (strictly loaded)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = ARCHITECTURES[config.pop("architecture")](**config)
    model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(map_location)))
    return model.eval()
''')
    return "\n\n".join(parts)


def _top_level_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [t.id for t in targets if isinstance(t, ast.Name)]
    return []


def load_folder(folder: Path, smp: bool) -> nn.Module:
    """The folder's model, loaded as the card says (in this process; the test does it in a fresh one)."""
    if smp:
        import segmentation_models_pytorch

        with contextlib.redirect_stdout(io.StringIO()):  # huggingface_hub prints "Loading weights from local directory"
            return segmentation_models_pytorch.from_pretrained(str(folder)).eval()
    spec = importlib.util.spec_from_file_location(f"modeling_segdist_{uuid.uuid4().hex}", folder / MODELING_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.from_pretrained(folder)


def check_loads(folder: Path, model: nn.Module, smp: bool, size, in_channels: int) -> float:
    """|folder's model - `model`| on a random normalised 1 x C x H x W input; a difference above
    MAX_ABS_DIFF is a bug (the same code and weights), raised as such."""
    loaded = load_folder(folder, smp)
    x = torch.randn(1, in_channels, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(x).float(), loaded(x).float()
    diff = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
    if not diff <= MAX_ABS_DIFF:
        raise RuntimeError(f"the exported folder's model differs from the checkpoint's by {diff:.3g} "
                           f"(shapes {list(got.shape)}, {list(expected.shape)})")
    return diff

