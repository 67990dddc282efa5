"""Tiny synthetic LiTS-layout cases for the data-stage tests (a few KB each)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def make_volume(shape=(40, 48, 12), seed=0, tumor=True):
    """A body disc with a liver blob and (optionally) a tumor; returns (hu int16, labels uint8)."""
    rng = np.random.default_rng(seed)
    rows, cols, slices = shape
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    body = ((r - rows / 2) / (rows * 0.45)) ** 2 + ((c - cols / 2) / (cols * 0.45)) ** 2 < 1
    hu = np.full(shape, -1000.0)
    labels = np.zeros(shape, np.uint8)
    for k in range(slices):
        hu[..., k][body] = 30
        if 2 <= k < slices - 2:
            liver = ((r - rows * 0.45) / 8) ** 2 + ((c - cols * 0.35) / 10) ** 2 < 1
            hu[..., k][liver] = 60
            labels[..., k][liver] = 1
            if tumor and 4 <= k < slices - 4:
                lesion = ((r - rows * 0.45) / 3) ** 2 + ((c - cols * 0.35) / 3) ** 2 < 1
                hu[..., k][lesion] = 20
                labels[..., k][lesion] = 2
    hu += rng.normal(0, 5, shape)
    hu[:2] = -3024  # out-of-field padding
    return hu.astype(np.int16), labels


def write_case(folder: Path, case_id: str, shape=(40, 48, 12), affine=None, seed=0, tumor=True, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([-0.8, -0.8, 2.5, 1.0]) if affine is None else affine
    hu, labels = make_volume(shape, seed, tumor)
    suffix = ".nii.gz" if gz else ".nii"
    image_path = folder / f"volume-{case_id}{suffix}"
    label_path = folder / f"segmentation-{case_id}{suffix}"
    nib.save(nib.Nifti1Image(hu, affine), str(image_path))
    nib.save(nib.Nifti1Image(labels, affine), str(label_path))
    return image_path, label_path
