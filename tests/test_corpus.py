"""The chest-CT corpus: slices in HU, annotations on the right slices, and a split with no shared patient."""

from __future__ import annotations

import numpy as np
import pytest

from models.corpus import (
    DEFAULT_DATA_ROOT,
    DEFAULT_TEST_PATIENTS,
    discover,
    load_annotations,
    patients_of,
    split_by_patient,
)
from models.lungmask import has_lungs, lung_mask

pytestmark = pytest.mark.skipif(not DEFAULT_DATA_ROOT.is_dir(), reason="shared chest-CT corpus not present")


@pytest.fixture(scope="module")
def corpus():
    return discover()


def test_split_has_no_patient_on_both_sides(corpus) -> None:
    train, test = split_by_patient(corpus)
    assert train and test
    assert not set(patients_of(train)) & set(patients_of(test))
    assert set(patients_of(test)) <= set(DEFAULT_TEST_PATIENTS)
    assert len(train) + len(test) == len(corpus)


def test_corpus_reads_every_source_as_axial_hu(corpus) -> None:
    patients = set(patients_of(corpus))
    assert {"LIDC-IDRI-0001", "LIDC-IDRI-0002", "Lung_Dx-A0001", "pyradiomics-lung1"} <= patients
    assert all(s.plane == "axial" for s in corpus)
    nrrd_slice = next(s for s in corpus if s.index is not None)
    dicom_slice = next(s for s in corpus if s.patient == "A002304")  # GE: pads with -3024 / -2000
    for item in (nrrd_slice, dicom_slice):
        hu = item.hu()
        assert hu.shape == (512, 512) and hu.dtype == np.float32
        assert hu.min() >= -1024.0 and hu.max() <= 3071.0
        assert -1000 < np.median(hu[hu > -500]) < 200  # soft tissue exists: the rescale was applied


def test_annotations_land_in_lungs_of_their_slices(corpus) -> None:
    lesions = load_annotations()
    by_key = {s.key: s for s in corpus}
    sources = {les.source for key, items in lesions.items() if key in by_key for les in items}
    assert sources == {"lidc-outline", "voc-box", "pyradiomics-label"}
    lidc_key = next(k for k, items in lesions.items() if k in by_key and items[0].source == "lidc-outline")
    hu = by_key[lidc_key].hu()
    lesion = lesions[lidc_key][0]
    mask = lesion.region_mask(hu.shape)
    assert mask.any() and mask.sum() < (lesion.x1 - lesion.x0) * (lesion.y1 - lesion.y0) + 1
    lungs = lung_mask(hu, dilate_px=10)
    assert lungs[mask].mean() > 0.9  # the outline matches the image: it is in a lung
    parenchyma = np.median(hu[lung_mask(hu) & ~mask])
    assert hu[mask].mean() > parenchyma + 100  # and it is a nodule, denser than the parenchyma


def test_lung_mask_rejects_a_slice_without_lungs() -> None:
    phantom = np.full((128, 128), -1000.0, dtype=np.float32)
    yy, xx = np.mgrid[:128, :128]
    phantom[(yy - 64) ** 2 + (xx - 64) ** 2 < 50**2] = 40.0  # a water disc: a body without any lung
    assert not has_lungs(phantom)
    phantom[(yy - 64) ** 2 + (xx - 50) ** 2 < 15**2] = -850.0  # an air-filled lobe inside it
    assert has_lungs(phantom)
