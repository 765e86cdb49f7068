"""Teachers of the soft-label evaluation (evaluate.labels: soft): a frozen classifier that labels each batch the
student sees. Either the full-data classifier the evaluation trains itself (`full`), or a file of
torchvision-layout ResNet weights (an ImageNet-pretrained ResNet-18 is the teacher of RDED / SRe²L on
ImageNet-1K), whose 1000 outputs are narrowed to the data's classes by their wnids.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from diffdistill.config import EvalConfig
from diffdistill.data.classes import imagenet_ids, imagenet_wnids
from diffdistill.errors import StageError
from diffdistill.models.classifiers import build_classifier, load_torchvision_resnet

# torchvision's ImageNet normalization: the input statistics of a torchvision teacher
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
DOWNLOAD_HINT = {  # torchvision's own files (IMAGENET1K_V1), for the one-line "what to download"
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}


class Teacher(nn.Module):
    """A frozen net on the student's normalized input: it re-normalizes the batch to its own statistics (if
    they differ), runs, and returns logits [B, C] over the data's classes (`columns` of its outputs)."""

    def __init__(self, net: nn.Module, columns: list[int] | None = None,
                 rescale: tuple[Tensor, Tensor] | None = None) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.columns = columns
        self.rescale = rescale  # (a, b) [1, C, 1, 1]: x_teacher = a · x_student + b

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if self.rescale is not None:
            x = x * self.rescale[0] + self.rescale[1]
        out = self.net(x)
        return out if self.columns is None else out[:, self.columns]


def renormalize(student: tuple[Tensor, Tensor], teacher: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(a, b) with a · (x − m_s) / s_s + b = (x − m_t) / s_t: the student's normalized batch in the teacher's."""
    (ms, ss), (mt, st) = student, teacher
    return ss / st, (ms - mt) / st


def check_teacher(ecfg: EvalConfig) -> None:
    """Fail in one line, before any training, when soft labels are asked for without a teacher to give them:
    a `full` teacher without the full-data classifiers, or a teacher file that is not there."""
    if "soft" not in ecfg.labels:
        return
    if ecfg.soft.teacher == "full" and not ecfg.full:
        raise StageError("evaluate.soft.teacher=full needs the full-data classifiers: set evaluate.full=true, or "
                         "name a teacher file")
    if ecfg.soft.teacher != "full":
        weights_file(ecfg.soft.teacher, ecfg.soft.teacher_net)


def weights_file(spec: str, net: str) -> Path:
    """The weights file a teacher spec names (a file, a folder holding one, or a hub id already in the local
    Hugging Face cache), or a one-line error saying what to download."""
    path = Path(spec)
    if not path.exists() and path.suffix not in WEIGHT_SUFFIXES and _HUB_ID.fullmatch(spec):
        path = _hub_folder(spec)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        preferred = [p for p in found if p.name == "model.safetensors"] or found
        if not preferred:
            raise StageError(f"evaluate.soft.teacher: the folder {spec} holds no {', '.join(WEIGHT_SUFFIXES)} file")
        return preferred[0]
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise StageError(f"evaluate.soft.teacher: {spec} is not a {' / '.join(WEIGHT_SUFFIXES)} file")
        return path
    raise StageError(f"evaluate.soft.teacher: {spec} does not exist; download torchvision's {net} ImageNet "
                     f"weights ({DOWNLOAD_HINT[net]}) on a machine with internet, copy the file here and set "
                     f"evaluate.soft.teacher=FILE (or teacher=full: the full-data classifier trained here)")


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name, as the hub spells repositories


def _hub_folder(repo: str) -> Path:
    """The local snapshot of hub repository `repo` (nothing is downloaded at run time)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # not in the cache (offline: the hub library raises several types)
        raise StageError(f"evaluate.soft.teacher: {repo} is not a file or folder here and not in the local Hugging "
                         f"Face cache; on a machine with internet run `hf download {repo} --local-dir "
                         f"DIR`, copy DIR here and set evaluate.soft.teacher=DIR") from None


def read_state(file: Path) -> dict[str, Tensor]:
    """A state dict from safetensors or a weights-only torch file (a checkpoint's "state_dict" / "model" too)."""
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged or pickled-code files: say which, in one line
        raise StageError(f"evaluate.soft.teacher: {file} cannot be read as weights "
                         f"({str(err).splitlines()[0][:200]})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise StageError(f"evaluate.soft.teacher: {file} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_teacher(spec: str, net: str, names: list[str], channels: int) -> tuple[nn.Module, list[int] | None, str]:
    """(torchvision-layout `net` with the file's weights, the output columns of the data's classes (None: all,
    in order), the file's SHA-256). Wrong architecture, class count or channels: a one-line error."""
    file = weights_file(spec, net)
    state = read_state(file)
    head = state.get("fc.weight")
    if head is None or head.dim() != 2:
        raise StageError(f"evaluate.soft.teacher: {file} has no fc.weight: not a torchvision ResNet state dict")
    outputs = head.shape[0]
    if channels != 3:
        raise StageError(f"evaluate.soft.teacher: a torchvision teacher takes RGB images; the data has {channels} "
                         f"channel(s) (use teacher=full)")
    if outputs == len(imagenet_wnids()) and set(names) <= set(imagenet_wnids()):
        columns = imagenet_ids(names)  # an ImageNet teacher: its logits of the data's classes, in the data's order
    elif outputs == len(names):
        columns = None
    else:
        raise StageError(f"evaluate.soft.teacher: {file} classifies {outputs} classes; the data has {len(names)} "
                         f"(an ImageNet-1K teacher needs ImageNet wnids as class names)")
    model = build_classifier(net, 3, outputs, 224, norm="batch")  # 224: torchvision's stem at any input size
    try:
        load_torchvision_resnet(model, state, str(file))
    except ValueError as err:
        raise StageError(f"evaluate.soft.teacher: {err} (evaluate.soft.teacher_net={net})") from None
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    return model, columns, digest
