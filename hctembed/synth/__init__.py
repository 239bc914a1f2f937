"""Synthetic non-contrast head CT: the project's test and demo data.

Analytic head anatomy in world millimetres (:mod:`.anatomy`), five acute haemorrhage subtypes
(:mod:`.lesions`), patients that combine them (:mod:`.patient`), scanner protocols and voxel grids
(:mod:`.protocol`) and whole archives of NIfTI files with a ``labels.csv`` (:mod:`.archive`).

Typical use::

    from hctembed.synth import SynthConfig, generate_archive
    records = generate_archive(Path("demo-out/archive"), n=40, seed=0, config=SynthConfig(matrix=128))
"""

from .anatomy import HeadAnatomy, Tissue
from .archive import LABEL_COLUMNS, ScanRecord, generate_archive, read_labels, save_nifti
from .lesions import SUBTYPES
from .patient import SyntheticPatient, choose_subtypes, make_patient, render_points
from .protocol import ScanProtocol, SynthConfig, noise_free, sample_protocol, synth_labels, synth_scan

__all__ = [
    "LABEL_COLUMNS",
    "SUBTYPES",
    "HeadAnatomy",
    "ScanProtocol",
    "ScanRecord",
    "SynthConfig",
    "SyntheticPatient",
    "Tissue",
    "choose_subtypes",
    "generate_archive",
    "make_patient",
    "noise_free",
    "read_labels",
    "render_points",
    "sample_protocol",
    "save_nifti",
    "synth_labels",
    "synth_scan",
]
