"""Pretrained starts: the known starting points of every preset, finding them on disk, loading them.

Two kinds of file, as the original image used them:

* **model-zoo checkpoints**: mmsegmentation's Cityscapes models of the original image's performance
  table (a full segmentation model; fine-tuned, the classifiers start fresh when the class count
  differs);
* **ImageNet backbones**: the classification networks mmcv and torchvision publish, which the mmseg
  configs start from (``pretrained='open-mmlab://resnet18_v1c'``). They hold the backbone's keys
  without the ``backbone.`` prefix plus a classification head the segmentation model has not.

``pretrained=auto`` (the default) looks in the weights folder for the preset's model-zoo checkpoint,
then its ImageNet backbone, else trains from scratch with a warning; it never downloads anything
(``mirseg weights download`` does, when asked). The file used and its sha256 go into the log and
into the saved config as ``pretrained: <path>@sha256:<hex>``, which a later run verifies.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import nn

from mirseg.checkpoint import extract_state_dict, load_weights, read_checkpoint
from mirseg.config import MMSEG_CONFIGS, PRESETS, TrainConfig
from mirseg.download import DownloadError, Fetched, fetch, hash_in_name, sha256_file
from mirseg.errors import ConfigError, MissingFileError

log = logging.getLogger("mirseg")

ENV_VAR = "MIRSEG_WEIGHTS"
YMIR_WEIGHTS_DIR = "/weights"  # where the original image baked its model-zoo files, and ours does
PIN = "@sha256:"  # pretrained: <path>@sha256:<hex> pins the file a run started from
PREFIX = "backbone."  # where an ImageNet file's keys go in our models (mmseg's names)
OPTIONAL_SUFFIXES = ("num_batches_tracked",)  # BN counters old files lack; ours are kept


@dataclass(frozen=True)
class WeightFile:
    """One published starting point."""

    name: str  # the file name; ends in -<first 8 hex digits of its sha256>.pth
    url: str  # where its publisher serves it
    kind: Literal["zoo", "imagenet"]
    models: tuple[str, ...]  # the architectures (mirseg.models.MODELS keys) it fits
    config: str = ""  # zoo: the mmseg config it was trained with (a key of MMSEG_CONFIGS)
    published_as: str = ""  # imagenet: the name mmseg configs give it
    ignore: tuple[str, ...] = ()  # imagenet: key prefixes of the classification head, not loaded

    @property
    def sha256_prefix(self) -> str:
        return hash_in_name(self.name)

    @property
    def presets(self) -> list[str]:
        return [name for name, p in PRESETS.items() if p.model in self.models]


# -- the model zoo: the original image's performance table (mmseg v0.5 Cityscapes checkpoints).
_ZOO_BASE = "https://download.openmmlab.com/mmsegmentation/v0.5"
_ZOO: list[tuple[str, str, str]] = [  # (mmseg config, folder on the server, the file's date-hash tag)
    ("configs/fastscnn/fast_scnn_lr0.12_8x4_160k_cityscapes.py", "fast_scnn", "20210630_164853-0cec9937"),
    ("configs/hrnet/fcn_hr18s_512x1024_40k_cityscapes.py", "hrnet", "20200601_014216-93db27d0"),
    ("configs/hrnet/fcn_hr18_512x1024_40k_cityscapes.py", "hrnet", "20200601_014216-f196fb4e"),
    ("configs/hrnet/fcn_hr18s_512x1024_80k_cityscapes.py", "hrnet", "20200601_202700-1462b75d"),
    ("configs/hrnet/fcn_hr18_512x1024_80k_cityscapes.py", "hrnet", "20200601_223255-4e7b345e"),
    ("configs/hrnet/fcn_hr18s_512x1024_160k_cityscapes.py", "hrnet", "20200602_190901-4a0797ea"),
    ("configs/hrnet/fcn_hr18_512x1024_160k_cityscapes.py", "hrnet", "20200602_190822-221e4a4f"),
    ("configs/deeplabv3plus/deeplabv3plus_r50-d8_512x1024_40k_cityscapes.py", "deeplabv3plus",
     "20200605_094610-d222ffcd"),
    ("configs/deeplabv3plus/deeplabv3plus_r50-d8_769x769_40k_cityscapes.py", "deeplabv3plus",
     "20200606_114143-1dcb0e3c"),
    ("configs/deeplabv3plus/deeplabv3plus_r18-d8_512x1024_80k_cityscapes.py", "deeplabv3plus",
     "20201226_080942-cff257fe"),
    ("configs/deeplabv3plus/deeplabv3plus_r18-d8_769x769_80k_cityscapes.py", "deeplabv3plus",
     "20201226_083346-f326e06a"),
    ("configs/deeplabv3plus/deeplabv3plus_r18b-d8_512x1024_80k_cityscapes.py", "deeplabv3plus",
     "20201226_090828-e451abd9"),
    ("configs/deeplabv3plus/deeplabv3plus_r18b-d8_769x769_80k_cityscapes.py", "deeplabv3plus",
     "20201226_151312-2c868aff"),
    ("configs/ocrnet/ocrnet_hr18s_512x1024_40k_cityscapes.py", "ocrnet", "20200601_033304-fa2436c2"),
    ("configs/ocrnet/ocrnet_hr18_512x1024_40k_cityscapes.py", "ocrnet", "20200601_033320-401c5bdd"),
    ("configs/ocrnet/ocrnet_hr18s_512x1024_80k_cityscapes.py", "ocrnet", "20200601_222735-55979e63"),
    ("configs/ocrnet/ocrnet_hr18_512x1024_80k_cityscapes.py", "ocrnet", "20200614_230521-c2e1dd4a"),
    ("configs/ocrnet/ocrnet_hr18s_512x1024_160k_cityscapes.py", "ocrnet", "20200602_191005-f4a7af28"),
    ("configs/ocrnet/ocrnet_hr18_512x1024_160k_cityscapes.py", "ocrnet", "20200602_191001-b9172d0c"),
]

# -- ImageNet backbones, as mmcv (open-mmlab://) and torchvision (torchvision://) publish them.
_MMCV = "https://download.openmmlab.com/pretrain/third_party"
_RESNET_HEAD = ("fc.",)
_HRNET_HEAD = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")
_IMAGENET: list[tuple[str, str, str, tuple[str, ...], tuple[str, ...]]] = [  # name, url, published as, models, head
    ("resnet18_v1c-b5776b93.pth", _MMCV, "open-mmlab://resnet18_v1c", ("deeplabv3plus_r18",), _RESNET_HEAD),
    ("resnet50_v1c-2cccc1ad.pth", _MMCV, "open-mmlab://resnet50_v1c", ("deeplabv3plus_r50",), _RESNET_HEAD),
    ("resnet18-f37072fd.pth", "https://download.pytorch.org/models", "torchvision://resnet18",
     ("deeplabv3plus_r18b",), _RESNET_HEAD),
    ("hrnetv2_w18_small-b5a04e21.pth", _MMCV, "open-mmlab://msra/hrnetv2_w18_small", ("hrnet_w18s", "ocrnet_hr18s"),
     _HRNET_HEAD),
    ("hrnetv2_w18-00eb2006.pth", _MMCV, "open-mmlab://msra/hrnetv2_w18", ("hrnet_w18", "ocrnet_hr18"), _HRNET_HEAD),
]


def _config_stem(config: str) -> str:
    return Path(config).name.removesuffix(".py")


def _known() -> dict[str, WeightFile]:
    files: list[WeightFile] = []
    for config, folder, tag in _ZOO:
        stem = _config_stem(config)
        name = f"{stem}_{tag}.pth"
        model = PRESETS[MMSEG_CONFIGS[config][0]].model
        files.append(WeightFile(name, f"{_ZOO_BASE}/{folder}/{stem}/{name}", "zoo", (model,), config=config))
    for name, base, published, models, head in _IMAGENET:
        files.append(WeightFile(name, f"{base}/{name}", "imagenet", models, published_as=published, ignore=head))
    return {f.name: f for f in files}


KNOWN: dict[str, WeightFile] = _known()

# The config each preset mirrors: the first one MMSEG_CONFIGS lists for it.
PRESET_CONFIG: dict[str, str] = {}
for _path, (_preset, _iters) in MMSEG_CONFIGS.items():
    PRESET_CONFIG.setdefault(_preset, _path)


def zoo_file(preset: str) -> WeightFile | None:
    """The model-zoo checkpoint of a preset's own mmseg config."""
    config = PRESET_CONFIG.get(preset)
    return next((f for f in KNOWN.values() if f.kind == "zoo" and f.config == config), None)


def imagenet_file(model: str) -> WeightFile | None:
    """The ImageNet backbone file of an architecture (None for FastSCNN, which its config trains from scratch)."""
    return next((f for f in KNOWN.values() if f.kind == "imagenet" and model in f.models), None)


# ---------------------------------------------------------------------------------------------
# Where files are


def weights_dir(value: str = "", default: str | os.PathLike | None = None) -> Path:
    """The weights folder: ``value`` (the ``weights_dir`` key), else $MIRSEG_WEIGHTS, else ``default``,
    else ``~/.cache/mirseg/weights`` ($XDG_CACHE_HOME/mirseg/weights when that is set)."""
    if value:
        return Path(value).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    if default is not None:
        return Path(default)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "mirseg" / "weights"


def _config_path(config_file: str) -> str | None:
    norm = config_file.strip().replace("\\", "/")
    if "configs/" in norm:
        norm = "configs/" + norm.split("configs/", 1)[1]
    return norm if norm in MMSEG_CONFIGS else None


def preset_of(config_file: str) -> str:
    """The preset name of a preset or of one of the original image's mmseg config paths."""
    path = _config_path(config_file)
    return MMSEG_CONFIGS[path][0] if path else config_file.strip()


def zoo_candidates(config_file: str) -> list[str]:
    """The mmseg config stems whose model-zoo files fit ``config_file``'s network, best first.

    The config itself (when ``config_file`` is an mmseg config path), then the preset's own config,
    then every other config of the same architecture (another crop or schedule: the same weights).
    """
    preset = preset_of(config_file)
    model = PRESETS[preset].model
    order = [_config_path(config_file), PRESET_CONFIG.get(preset)]
    order += [c for c, (p, _) in MMSEG_CONFIGS.items() if PRESETS[p].model == model]
    stems: list[str] = []
    for config in order:
        if config and _config_stem(config) not in stems:
            stems.append(_config_stem(config))
    return stems


@dataclass(frozen=True)
class Start:
    """A pretrained file to start from, and what it is."""

    path: Path
    kind: Literal["zoo", "imagenet", "file"]  # file: a path the user gave (its kind is read from its keys)


def _glob(folder: Path, pattern: str) -> list[Path]:
    # "**/" as the original image searched /weights: files may sit in sub-folders. Hidden names are
    # skipped: a download in progress is a hidden temp file.
    return sorted(p for p in folder.glob(f"**/{pattern}") if p.is_file() and not p.name.startswith("."))


def find_start(config_file: str, folder: Path) -> Start | None:
    """What ``pretrained=auto`` starts from in ``folder``: a model-zoo checkpoint, else the ImageNet backbone.

    A model-zoo file is any ``<config name>*.pth`` (the original image's rule), the published name
    first, else the last by name (the newest date).
    """
    if not folder.is_dir():
        return None
    for stem in zoo_candidates(config_file):
        found = _glob(folder, f"{stem}*.pth")
        if found:
            known = [p for p in found if p.name in KNOWN]
            return Start((known or found)[-1], "zoo")
    backbone = imagenet_file(PRESETS[preset_of(config_file)].model)
    if backbone is not None:
        found = _glob(folder, backbone.name)
        if found:
            return Start(found[0], "imagenet")
    return None


def _wanted(config_file: str) -> list[str]:
    """What ``auto`` looks for, for the warning when nothing is there."""
    preset = preset_of(config_file)
    out = [f"{zoo_candidates(config_file)[0]}*.pth"]
    if (backbone := imagenet_file(PRESETS[preset].model)) is not None:
        out.append(backbone.name)
    return out


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class BackboneReport:
    """What ``load_backbone`` did: backbone keys filled, head keys of the file ignored."""

    loaded: list[str]
    ignored: list[str]


def _keys(keys: Sequence[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _head_summary(keys: Sequence[str]) -> str:
    """``fc.weight, fc.bias`` or, for a big head, ``incre_modules.* (120), classifier.* (2)``."""
    if len(keys) <= 8:
        return ", ".join(keys)
    groups: dict[str, int] = {}
    for k in keys:
        groups[k.split(".", 1)[0]] = groups.get(k.split(".", 1)[0], 0) + 1
    return ", ".join(f"{g}.* ({n})" for g, n in groups.items())


def head_prefixes(model: str) -> tuple[str, ...]:
    """The classification-head keys an ImageNet file of ``model``'s backbone carries."""
    backbone = imagenet_file(model)
    return backbone.ignore if backbone is not None else ()


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str, ignore: Iterable[str] = (),
                  arch: str = "") -> BackboneReport:
    """Fill ``model``'s backbone from an ImageNet state dict whose keys lack the ``backbone.`` prefix.

    Keys starting with one of ``ignore`` (the classification head) are skipped and named in one log
    line; any backbone key missing from the file (BN counters aside), any other extra key, and any
    shape that differs is an error naming the keys.
    """
    ignore = tuple(ignore)
    own = {k[len(PREFIX):]: v for k, v in model.state_dict().items() if k.startswith(PREFIX)}
    ignored = [k for k in state if k not in own and k.startswith(ignore)] if ignore else []
    rest = {k: v for k, v in state.items() if k not in set(ignored)}
    missing = [k for k in own if k not in rest and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in rest if k not in own]
    bad = [k for k in rest if k in own and tuple(rest[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        parts = [f"{source} does not fit the backbone of {arch or type(model).__name__}"]
        if missing:
            parts.append(f"backbone keys missing from the file ({len(missing)}): {_keys(missing)}")
        if unexpected:
            parts.append(f"keys the backbone does not have ({len(unexpected)}): {_keys(unexpected)}")
        parts += [f"{k}: file {tuple(rest[k].shape)} vs model {tuple(own[k].shape)}" for k in bad[:5]]
        expected = imagenet_file(arch) if arch else None
        parts.append("is it the ImageNet file of another backbone? "
                     + (f"{arch}'s is {expected.name} ({expected.published_as})" if expected else
                        "`mirseg weights list` names the file of each preset")
                     + "; or set pretrained=none")
        raise ConfigError("; ".join(parts))
    model.load_state_dict({PREFIX + k: v for k, v in rest.items()}, strict=False)
    if ignored:
        log.info("%s: ignored the classification head the segmentation model has not (%d keys: %s)", source,
                 len(ignored), _head_summary(ignored))
    return BackboneReport(loaded=[PREFIX + k for k in rest], ignored=ignored)


def _split_pin(spec: str) -> tuple[str, str]:
    path, _, digest = spec.partition(PIN)
    return path, digest.strip().lower()


_NONE = ("none", "null", "false", "no", "off", "")  # YAML null / false arrive as these strings


def check_spec(spec: str) -> Path | None:
    """The file a ``pretrained`` value names (None for auto / none); MissingFileError naming the key if absent."""
    if spec.strip().lower() in (*_NONE, "auto"):
        return None
    path = Path(_split_pin(spec.strip())[0]).expanduser()
    if not path.is_file():
        raise MissingFileError(f"pretrained: {path} does not exist; give an existing model-zoo checkpoint or ImageNet "
                               f"backbone file, auto (look in the weights folder) or none (random weights)")
    return path


def resolve_start(cfg: TrainConfig, verbose: bool = True) -> Start | None:
    """The file ``cfg.pretrained`` asks for; None for ``none``, or for ``auto`` when nothing is on disk (warned)."""
    spec = cfg.pretrained.strip()
    if spec.lower() in _NONE:
        return None
    if spec.lower() == "auto":
        folder = weights_dir(cfg.weights_dir)
        start = find_start(cfg.config_file, folder)
        if start is None and verbose:
            preset = preset_of(cfg.config_file)
            log.warning("no pretrained weights for %s in %s (looked for %s): training starts from random weights, "
                        "which needs far more data and iterations. Fetch them once with `mirseg weights download "
                        "%s` (`mirseg weights list` shows the files and where they go; copy them there by hand on "
                        "an offline machine), or set pretrained=none to train from scratch without this warning",
                        cfg.config_file, folder, " or ".join(_wanted(cfg.config_file)), preset)
        return start
    return Start(check_spec(spec), "file")


def load_start(model: nn.Module, start: Start, arch: str, verbose: bool = True, trust: bool = False) -> str:
    """Load ``start`` into ``model`` (architecture ``arch``); returns what it was, for the log.

    A file with ``backbone.``-prefixed keys is a whole segmentation model (model zoo, mirseg or mmseg
    checkpoint): fine-tuned with ``load_weights``. Otherwise it is an ImageNet backbone.
    """
    if start.kind == "zoo":
        load_weights(model, start.path, trust)
        return "model-zoo checkpoint"
    state = extract_state_dict(read_checkpoint(start.path, trust), str(start.path))
    if start.kind == "file" and any(k.startswith(PREFIX) for k in state):
        del state  # load_weights reads the file itself
        load_weights(model, start.path, trust)
        return "segmentation checkpoint"
    report = load_backbone(model, state, str(start.path), head_prefixes(arch), arch)
    if verbose:
        log.info("%s: loaded %d backbone tensors", start.path, len(report.loaded))
    return "ImageNet backbone"


def initialise(model: nn.Module, cfg: TrainConfig, verbose: bool = True) -> TrainConfig:
    """Give a freshly built ``model`` its start; returns ``cfg`` with ``pretrained`` saying what was used.

    ``weights`` (a full checkpoint) wins over ``pretrained``; a resumed run takes its weights from
    last.pth and keeps the start its first run recorded. ``pretrained`` becomes ``<path>@sha256:<hex>``
    or ``none``, so the saved config.yaml says which file the run started from and a rerun of it
    checks that the file is still the same.
    """
    if cfg.resume:
        return _recorded_start(cfg)
    if cfg.weights:
        load_weights(model, cfg.weights, cfg.trust_checkpoint)
        if verbose:
            log.info("initial weights: %s (sha256 %s); pretrained is not used when weights is set", cfg.weights,
                     sha256_file(cfg.weights))
        return cfg
    start = resolve_start(cfg, verbose)
    if start is None:
        return dataclasses.replace(cfg, pretrained="none")
    digest = sha256_file(start.path)
    pinned = _split_pin(cfg.pretrained)[1]
    if pinned and not digest.startswith(pinned):
        raise ConfigError(f"pretrained: {start.path} has sha256 {digest}, not the {pinned} the config pins: the file "
                          "changed since that run; restore it, or drop the @sha256:... part to accept the new file")
    named = hash_in_name(start.path.name)
    if named and not digest.startswith(named) and verbose:
        log.warning("%s: its sha256 %s does not start with the %s in its name: not the published file (a copy of "
                    "your own, or damaged?); `mirseg weights download` fetches the published one", start.path,
                    digest, named)
    what = load_start(model, start, cfg.model, verbose, cfg.trust_checkpoint)
    if verbose:
        log.info("pretrained start: %s %s (sha256 %s)", what, start.path, digest)
    return dataclasses.replace(cfg, pretrained=f"{start.path.resolve()}{PIN}{digest}")


def _recorded_start(cfg: TrainConfig) -> TrainConfig:
    """On resume: the ``pretrained`` the run's first config.yaml recorded (the weights come from last.pth)."""
    path = Path(cfg.work_dir) / "config.yaml"
    try:
        saved: Any = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return cfg  # only the record is lost; resuming itself reads last.pth and fails clearly if it cannot
    value = saved.get("pretrained") if isinstance(saved, dict) else None
    return dataclasses.replace(cfg, pretrained=value) if isinstance(value, str) else cfg


# ---------------------------------------------------------------------------------------------
# mirseg weights list / download


GROUPS = {"zoo": "every model-zoo checkpoint", "imagenet": "every ImageNet backbone", "all": "every known file"}


def select(names: Sequence[str], everything: bool = False, url_base: str = "") -> list[WeightFile]:
    """The files ``mirseg weights download`` fetches for ``names``: file names, presets, ``zoo``, ``imagenet``, ``all``.

    A preset stands for its model-zoo checkpoint (what ``auto`` takes first). With ``url_base``, a
    file name not in the table but ending in ``-<sha256 prefix>.pth`` is fetched from there too.
    """
    if everything:
        return list(KNOWN.values())
    if not names:
        raise ConfigError("mirseg weights download: name a file, a preset, zoo, imagenet or all, or pass --all "
                          "(`mirseg weights list` shows them)")
    out: list[WeightFile] = []
    for name in names:
        if name in KNOWN:
            chosen = [KNOWN[name]]
        elif name in GROUPS:
            chosen = [f for f in KNOWN.values() if name in (f.kind, "all")]
        elif name in PRESETS:
            chosen = [f for f in (zoo_file(name),) if f is not None]
        elif url_base and hash_in_name(name) and name.endswith(".pth") and "/" not in name:
            chosen = [WeightFile(name, "", "zoo", ())]
        else:
            hint = difflib.get_close_matches(name, list(KNOWN) + list(PRESETS) + list(GROUPS), n=1, cutoff=0.5)
            raise ConfigError(f"mirseg weights download: unknown file or preset {name!r}"
                              + (f"; did you mean {hint[0]!r}?" if hint else "")
                              + " (`mirseg weights list` shows the known files; with --url-base any name ending in "
                                "-<sha256 prefix>.pth can be fetched)")
        out += [f for f in chosen if f not in out]
    return out


def url_of(wf: WeightFile, url_base: str = "") -> str:
    """Where to fetch ``wf``: ``<url_base>/<name>`` for a mirror, else its publisher's URL."""
    return f"{url_base.rstrip('/')}/{wf.name}" if url_base else wf.url


def listing(folder: Path) -> str:
    """The ``mirseg weights list`` table: every known file, its presets, its size if present, its place."""
    rows = [("file", "kind", "presets", "size", "path")]
    for wf in KNOWN.values():
        path = folder / wf.name
        found = next(iter(_glob(folder, wf.name)), None) if folder.is_dir() else None
        size = f"{found.stat().st_size / 1e6:.1f} MB" if found else "-"
        rows.append((wf.name, wf.kind, ",".join(wf.presets), size, str(found or path)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"weights folder: {folder} (weights_dir key / --dir, else ${ENV_VAR}, else ~/.cache/mirseg/weights)"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    return "\n".join(lines)


def download(names: Sequence[str], everything: bool, folder: Path, url_base: str = "",
             progress: bool = True) -> tuple[list[Fetched], list[str]]:
    """``mirseg weights download``: fetch the files ``select`` names into ``folder``; (fetched, names that failed).

    One failure (logged with its reason) does not stop the others; nothing is left of a failed file.
    """
    fetched, failed = [], []
    for wf in select(names, everything, url_base):
        url = url_of(wf, url_base)
        try:
            got = fetch(url, folder / wf.name, wf.sha256_prefix, progress)
        except DownloadError as exc:
            log.error("%s", exc)
            failed.append(wf.name)
            continue
        if got.downloaded:
            log.info("%s: downloaded from %s", got.path, url)
        fetched.append(got)
    return fetched, failed
