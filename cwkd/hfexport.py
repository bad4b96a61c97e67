"""The Hugging Face format: a model folder that ``timm.create_model("hf-hub:USER/REPO")`` loads.

The folder holds ``model.safetensors`` and ``config.json`` written by timm's own ``save_for_hf`` (the
architecture, classes and their names, and the pretrained config with the trained input size, mean and
std), and a ``README.md`` model card (the teacher, the data, the measured scores, the
``knowledge-distillation`` and ``cwkd`` tags). It loads offline with
``timm.create_model("local-dir:FOLDER", pretrained=True)``, and once uploaded (``push``) from the Hub.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

from torch import nn

from cwkd.errors import ExportError
from cwkd.files.metadata import CheckpointMeta
from cwkd.tasks import get_task

#: The files an export writes (and the only ones ``--overwrite`` replaces in an existing folder).
FILES = ("model.safetensors", "config.json", "README.md")
#: Keys of the student's timm config that describe the ImageNet weights it was built for, not these.
_NOT_OURS = ("tag", "license", "pool_size", "hf_hub_id", "url", "file", "hf_hub_filename")


def folder_for(checkpoint: Path, out: str | Path | None, overwrite: bool) -> Path:
    """Where the folder goes (default ``best-hf/`` next to ``best.safetensors``); a taken place is refused."""
    path = Path(out) if out is not None else checkpoint.with_name(checkpoint.stem + "-hf")
    if path.is_file() or path.is_symlink():
        raise ExportError(f"--out {path} is a file; --format hf writes a folder: choose a new --out folder")
    if path.is_dir() and any(path.iterdir()):
        others = sorted(p.name for p in path.iterdir() if p.name not in FILES)
        if others:
            raise ExportError(f"--out {path} holds other files ({', '.join(others[:3])}); choose a new --out folder")
        if not overwrite:
            raise ExportError(f"{path} already holds an export; pass --overwrite to replace it, or choose "
                              "another --out")
    return path


def write_folder(student: nn.Module, meta: CheckpointMeta, path: Path) -> Path:
    """Write the folder into a temp folder beside ``path``, returned for checking; :func:`publish` moves it in place."""
    from timm.models._hub import save_for_hf

    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    saved = student.pretrained_cfg
    student.pretrained_cfg = {k: v for k, v in saved.items() if k not in _NOT_OURS}
    try:
        data = {"input_size": tuple(meta.input_size), "mean": tuple(meta.mean), "std": tuple(meta.std)}
        data.update({k: getattr(meta, k) for k in ("interpolation", "crop_pct") if getattr(meta, k) is not None})
        save_for_hf(student, str(tmp), model_config={"label_names": list(meta.classes or ()), "cwkd": _facts(meta)},
                    safe_serialization=True, data_config=data)
        (tmp / "README.md").write_text(model_card(meta))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        student.pretrained_cfg = saved
    return tmp


def load_folder(path: Path) -> nn.Module:
    """The model in a written folder, loaded as a user does: ``timm.create_model("local-dir:DIR", pretrained=True)``."""
    import timm

    return timm.create_model(f"local-dir:{path}", pretrained=True).eval()


def publish(tmp: Path, path: Path) -> None:
    """Move the checked temp folder to ``path``, replacing an earlier export there."""
    if path.is_dir():
        for name in FILES:
            (path / name).unlink(missing_ok=True)
        path.rmdir()
    tmp.rename(path)


def push(path: Path, repo: str) -> str:
    """Upload the folder to the Hub model repo ``repo`` (made if new); an upload that fails is one line."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo, repo_type="model", exist_ok=True)
        info = api.upload_folder(folder_path=str(path), repo_id=repo, repo_type="model",
                                 commit_message="Add a student distilled with cwkd")
    except ImportError:
        raise ExportError(f"wrote {path}, but --push-to-hub needs huggingface_hub: pip install 'cwkd[hub]'; "
                          f"then upload the folder with `hf upload {repo} {path}`") from None
    except Exception as exc:  # offline, no token, no rights: the hub's errors come in many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"wrote {path}, but uploading it to {repo} failed ({reason}); log in with `hf auth "
                          f"login` where the Hub is reachable and upload it with `hf upload {repo} {path}`") from None
    return str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo}")


def _facts(meta: CheckpointMeta) -> dict:
    """What cwkd knows about the student, kept in config.json under ``cwkd`` (timm ignores it)."""
    facts = {"teacher": meta.teacher, "method": meta.method, "alpha": meta.alpha, "dataset": meta.dataset,
             "epoch": meta.epoch, "best_metric": meta.best_metric,
             **{f"val_{k}": v for k, v in meta.scores.items()},
             "teacher_metric": meta.teacher_metric, "teacher_score": meta.teacher_score,
             "cwkd_version": meta.cwkd_version}
    return {k: v for k, v in facts.items() if v is not None}


def model_card(meta: CheckpointMeta) -> str:
    """README.md: YAML front matter (library, tags, the teacher as base model where it is a Hub id) and a summary."""
    front = ["---", "library_name: timm", "pipeline_tag: image-classification", "tags:",
             *[f"- {tag}" for tag in ("image-classification", "timm", "knowledge-distillation", "cwkd")]]
    if meta.teacher and "/" in meta.teacher:  # the Hub takes only a repo id as base_model
        front.append(f"base_model: {meta.teacher}")
    distilled = bool(meta.teacher)
    lines = [f"# {meta.model}, {'distilled' if distilled else 'trained'} with cwkd", "", *_summary(meta), "",
             "```python", "import timm", "", 'model = timm.create_model("hf-hub:USER/REPO", pretrained=True)',
             "config = timm.data.resolve_data_config(model=model)  # the trained input size, mean and std",
             "transform = timm.data.create_transform(**config)", "```", "",
             "Made with [cwkd](https://pypi.org/project/cwkd/) (channel-wise feature knowledge distillation).", ""]
    return "\n".join([*front, "---", "", *lines])


def _summary(meta: CheckpointMeta) -> list[str]:
    """The card's bullet points: teacher, data, measured scores, input."""
    labels = get_task(meta.task).metrics
    lines = []
    if meta.teacher:
        alpha = f", alpha {meta.alpha:g}" if meta.alpha is not None else ""
        lines.append(f"- Teacher (base model): `{meta.teacher}`; method `{meta.method}`{alpha}")
        if meta.teacher_score is not None:
            label = labels.get(meta.teacher_metric or "", meta.teacher_metric)
            lines.append(f"- Teacher on the same validation split before training: {meta.teacher_score:.2f} % {label}")
    classes = list(meta.classes or ())
    named = f" ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})" if classes else ""
    lines.append(f"- Data: `{meta.dataset or 'not recorded'}`, {meta.num_classes} classes{named}")
    epoch = f" (best epoch {meta.epoch})" if meta.epoch else ""
    lines += [f"- Measured: {value:.2f} % {labels.get(name, name)} on the validation split{epoch}"
              for name, value in meta.scores.items()]
    size = "x".join(str(v) for v in meta.input_size[1:])
    lines.append(f"- Input: {meta.in_chans} channel(s), {size} px, mean {list(meta.mean)}, std {list(meta.std)}")
    return lines
