"""Synthetic chest CT phantoms for tests, the demo and the experiments (DESIGN §5); not runtime science.

* :mod:`.phantom` — :func:`make_phantom` (one study) and the :data:`FAMILIES` of anatomy;
* :mod:`.family_a` — the original anatomy, one function per part (torso, spine, sternum, ribs, mediastinum,
  lungs, parenchyma, airways and vessels);
* :mod:`.lesions` — the five pathology kinds, shared by every family;
* :mod:`.geometry` — grids, tubes, trees and smooth fields; :mod:`.writers` — NIfTI, masks, DICOM series;
* :mod:`.archive` — :func:`make_archive`: a phantom archive with its manifest.
"""

from .archive import make_archive
from .lesions import LESION_VOLUME_RANGE_CM3, PATHOLOGIES
from .phantom import CT_IMAGE_STORAGE, FAMILIES, SIZES, Phantom, make_phantom
from .writers import phantom_uid, write_dicom_series, write_mask, write_nifti

__all__ = [
    "CT_IMAGE_STORAGE",
    "FAMILIES",
    "LESION_VOLUME_RANGE_CM3",
    "PATHOLOGIES",
    "SIZES",
    "Phantom",
    "make_archive",
    "make_phantom",
    "phantom_uid",
    "write_dicom_series",
    "write_mask",
    "write_nifti",
]
