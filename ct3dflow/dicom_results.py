"""A study's result as DICOM objects a PACS viewer shows: a Segmentation of the abnormal region and a
Comprehensive 3D SR (TID 1500) with the decision, written with highdicom (no DICOM written by hand).

* **Segmentation** (BINARY, one segment "abnormal region", AI algorithm identification with the model name
  and version): the decision's abnormal components, resampled from the 2 mm grid back onto the source CT
  series' own grid (nearest neighbour) and referencing its SOP instances frame by frame, so viewers overlay
  it. Only a **flagged** study gets one: a normal study's sub-threshold voxels are what the decision
  dismissed, and a SEG of them would draw a reader's eye to them (a SEG with no frames is not valid DICOM
  either). Its SR says "normal" and the volume.
* **Structured Report** (TID 1500 Imaging Measurement Report): one measurement group with the patient-level
  finding (abnormal / normal), the abnormal volume (cm³), the threshold T (cm³) and the map kind; the model
  version is the algorithm identification of every measurement and the SR's device observer; a flagged
  study's group references the SEG's segment.

Both carry the study's patient and study modules (copied by highdicom from the source images, as the
standard requires) and go into one new series per model version, with UIDs derived from the study, the
model version and the input fingerprint: a re-run makes the same UIDs (so it can see that they are stored
already), changed inputs make new ones. No Ray, no MLflow; this module reads nothing from the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALGORITHM_NAME = "CT-3DFlow"
SCHEME = "99CT3DFLOW"  # a private coding scheme for what no standard code names
SERIES_NUMBER = 9301


def result_uid(*parts: str) -> str:
    """A DICOM UID derived from ``parts`` (deterministic: the same result gets the same UID)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["ct3dflow-result", *[str(p) for p in parts]]))


@dataclass
class Decision:
    flagged: bool
    abnormal_volume_cm3: float
    threshold_cm3: float
    map_kind: str
    model_name: str
    model_version: str


def sort_source(datasets):
    """Source images along the slice normal (the order frames are written in)."""
    def key(ds):
        o = np.asarray(ds.ImageOrientationPatient, dtype=float)
        n = np.cross(o[:3], o[3:])
        return float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), n))

    return sorted(datasets, key=key)


def mask_on_source_grid(abnormal_zyx: np.ndarray, study, source) -> np.ndarray:
    """The abnormal mask of the 2 mm grid resampled (nearest neighbour) onto the sorted source images'
    grid: ``(frames, rows, columns)`` bool, frame k on source image k."""
    import SimpleITK as sitk

    src = sort_source(source)
    o = np.asarray(src[0].ImageOrientationPatient, dtype=float)
    row, col = o[:3], o[3:]
    normal = np.cross(row, col)
    pos = np.array([np.asarray(ds.ImagePositionPatient, dtype=float) for ds in src])
    step = float(np.median(np.diff(pos @ normal))) if len(src) > 1 else float(getattr(src[0], "SliceThickness", 1))
    dy, dx = (float(v) for v in src[0].PixelSpacing)  # row spacing, column spacing
    ref = sitk.Image([int(src[0].Columns), int(src[0].Rows), len(src)], sitk.sitkUInt8)
    ref.SetSpacing((dx, dy, step))
    ref.SetOrigin(tuple(pos[0]))
    ref.SetDirection(tuple(np.column_stack([row, col, normal]).ravel()))
    mask = sitk.GetImageFromArray(np.ascontiguousarray(abnormal_zyx, dtype=np.uint8))
    mask.CopyInformation(study.reference_image())
    out = sitk.Resample(mask, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out).astype(bool)


def _algorithm(decision: Decision):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(name=ALGORITHM_NAME, version=decision.model_version,
                                              family=codes.cid7162.ArtificialIntelligence,
                                              parameters={"map": decision.map_kind})


def make_segmentation(source, mask_frames: np.ndarray, decision: Decision, series_uid: str, sop_uid: str):
    """The BINARY Segmentation of the abnormal region on the source series (frames in sorted order)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    src = sort_source(source)
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="abnormal region",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(decision), anatomic_regions=[codes.SCT.Lung])
    return hd.seg.Segmentation(
        source_images=src, pixel_array=mask_frames.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc], series_instance_uid=series_uid, series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=ALGORITHM_NAME,
        manufacturer_model_name=f"{decision.model_name} ({decision.map_kind} map)",
        software_versions=decision.model_version, device_serial_number="n/a",
        series_description=f"CT-3DFlow {decision.model_version}", omit_empty_frames=True)


def make_report(source, decision: Decision, series_uid: str, sop_uid: str, seg=None):
    """The Comprehensive 3D SR (TID 1500) of the study's decision; references the SEG's segment if given."""
    import highdicom as hd
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    src = sort_source(source)
    algo = hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=decision.model_version)
    cm3 = CodedConcept("cm3", "UCUM", "cubic centimeter")
    measurements = [
        hd.sr.Measurement(name=CodedConcept("ABNVOL", SCHEME, "Abnormal volume"),
                          value=float(decision.abnormal_volume_cm3), unit=cm3, algorithm_id=algo),
        hd.sr.Measurement(name=CodedConcept("THRESH", SCHEME, "Abnormal volume threshold T"),
                          value=float(decision.threshold_cm3), unit=cm3, algorithm_id=algo),
    ]
    finding = codes.SCT.Abnormal if decision.flagged else codes.SCT.Normal
    evaluations = [hd.sr.QualitativeEvaluation(name=codes.SCT.Finding, value=finding),
                   hd.sr.QualitativeEvaluation(name=CodedConcept("MAPKIND", SCHEME, "Atypicality map kind"),
                                               value=CodedConcept(decision.map_kind.upper(), SCHEME,
                                                                  f"{decision.map_kind} map"))]
    tracking = hd.sr.TrackingIdentifier(uid=result_uid("tracking", sop_uid), identifier="CT-3DFlow decision")
    if seg is not None:
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=1,
                source_series=hd.sr.SourceSeriesForSegmentation(src[0].SeriesInstanceUID)),
            finding_type=codes.SCT.Lesion, algorithm_id=algo, measurements=measurements,
            qualitative_evaluations=evaluations, finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)])
    else:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, finding_type=codes.SCT.Lung, algorithm_id=algo, measurements=measurements,
            qualitative_evaluations=evaluations)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid("device", decision.model_name), name=ALGORITHM_NAME,
            model_name=f"{decision.model_name} {decision.model_version}"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.cid100.CTUnspecifiedBodyRegion, imaging_measurements=[group],
        referenced_images=src[:1])
    evidence = src + ([seg] if seg is not None else [])
    return hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=series_uid, series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid, instance_number=2, manufacturer=ALGORITHM_NAME, is_complete=True,
        series_description=f"CT-3DFlow {decision.model_version}")


def read_report(ds) -> dict:
    """The decision an SR written here carries: ``{"finding", "abnormal_volume_cm3", "threshold_cm3",
    "map_kind", "model_version", "segment"}`` (for tests, and for anyone reading the results back)."""
    out: dict = {"segment": None}

    def walk(items):
        for it in items:
            name = it.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in it else ""
            if it.ValueType == "NUM":
                v = float(it.MeasuredValueSequence[0].NumericValue)
                if name == "Abnormal volume":
                    out["abnormal_volume_cm3"] = v
                elif name == "Abnormal volume threshold T":
                    out["threshold_cm3"] = v
            elif it.ValueType == "CODE":
                meaning = it.ConceptCodeSequence[0].CodeMeaning
                if name == "Finding":
                    out["finding"] = meaning
                elif name == "Atypicality map kind":
                    out["map_kind"] = meaning.split()[0]
            elif it.ValueType == "TEXT" and name == "Algorithm Version":
                out["model_version"] = str(it.TextValue)
            elif it.ValueType == "IMAGE" and "ReferencedSOPSequence" in it:
                ref = it.ReferencedSOPSequence[0]
                if "ReferencedSegmentNumber" in ref:
                    out["segment"] = (str(ref.ReferencedSOPInstanceUID), int(ref.ReferencedSegmentNumber))
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(ds.ContentSequence)
    return out
