"""Data layer: image decoding, COCO and label-folder datasets, the torch Dataset and the mmseg transforms."""

from mirseg.data.coco import CocoSample, dataset_classes, load_coco
from mirseg.data.dataset import DatasetError, SegDataset, label_histogram
from mirseg.data.images import ImageError, read_image
from mirseg.data.labelfolder import LabelFileSample, load_label_folder, read_label_png
from mirseg.data.transforms import EvalTransform, TrainTransform, normalize, rescale_size

__all__ = [
    "CocoSample",
    "DatasetError",
    "EvalTransform",
    "ImageError",
    "LabelFileSample",
    "SegDataset",
    "TrainTransform",
    "dataset_classes",
    "label_histogram",
    "load_coco",
    "load_label_folder",
    "normalize",
    "read_image",
    "read_label_png",
    "rescale_size",
]
