"""Datasets: ImageFolder trees (held in memory when small, streamed otherwise) and scikit-learn's digits.

folders.py (scan, decode, in-memory load), streams.py (FolderImages, TensorImages), digits.py (the
digits split), checks.py (the labelled-data check); the class-list files beside them are package data.

Image tensors follow the project convention: float32 [N, C, H, W] in [-1, 1] (or uint8 [N, C, H, W]
in [0, 255] on request), labels int64 [N].

ImageFolder layout: ``root/<class>/<image>``; classes are the sub-folders (sorted by name unless an
explicit ``class_names`` order is given), images are files with extension png / jpg / jpeg / bmp /
webp in any letter case. Hidden entries (names starting with '.') are ignored: they are editor /
macOS ("._x.jpg") debris or this project's own in-flight temporary files.

Preprocessing matches torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on PIL images, the
evaluation transform of MinimaxDiffusion / IDC: the shorter side is resized to ``image_size``
(bilinear, PIL's antialiased filter; longer side ``int(size * long / short)``), then the centre
``image_size`` square is cropped (offset ``int(round((side - size) / 2))``).

Large sets are streamed (:class:`FolderImages`): the folder scan lists paths and labels, DataLoader
workers decode and resize, images stay uint8 until they reach the device, one batch at a time. A
set whose decoded uint8 pixels fit ``IGDS_IN_MEMORY_MB`` (default 256 MiB; 0 = always stream) is
held in memory instead, behind the same interface and with the same batches bit for bit.
"""

from .checks import check_labelled_images
from .digits import load_digits_split, stratified_split
from .folders import (IMAGE_EXTENSIONS, ON_CORRUPT, LoadReport, check_folder_settings, is_image_file, load_image, load_image_folder, resize_and_center_crop,
                      scan_image_folder, uint8_to_unit_range)
from .streams import (DATA_WORKERS_ENV, DEFAULT_IN_MEMORY_MB, IN_MEMORY_ENV, FolderImages, TensorImages,
                      default_num_workers, in_memory_limit_bytes)

__all__ = [
    "DATA_WORKERS_ENV",
    "DEFAULT_IN_MEMORY_MB",
    "FolderImages",
    "IMAGE_EXTENSIONS",
    "IN_MEMORY_ENV",
    "LoadReport",
    "ON_CORRUPT",
    "TensorImages",
    "check_folder_settings",
    "check_labelled_images",
    "default_num_workers",
    "in_memory_limit_bytes",
    "is_image_file",
    "load_digits_split",
    "load_image",
    "load_image_folder",
    "resize_and_center_crop",
    "scan_image_folder",
    "stratified_split",
    "uint8_to_unit_range",
]
