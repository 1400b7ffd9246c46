"""A PACS as the screening job's source and sink, over DICOMweb (QIDO-RS, WADO-RS, STOW-RS).

``dicomweb_client`` speaks the protocol; this module decides what to ask (docs/PACS.md is the operator's
page):

* :class:`DicomWebSource` — the PACS's URL and credentials (from a file or the environment, never from the
  command line, never logged); :meth:`~DicomWebSource.check` fails the job at once with a clear message when
  the server is unreachable or refuses the credentials, before anything is written.
* **Finding studies** — QIDO-RS lists the studies whose StudyDate lies within ``lookback_days`` of the last
  successful run (a study that arrives late, or in pieces, is seen again); each study's *fingerprint* (its
  series and instance counts) is compared with the watermark of the last successful run
  (``<results>/sources/<source>.json``), so only new or changed studies are retrieved and screened.
* **Choosing the series** — the same rules as :func:`ct3dflow.io.read_ct`: CT, localizers dropped (from the
  series' WADO-RS metadata), axial before others, the most images; no CT series or only localizers → one
  error row with the reason.
* **Retrieving** — WADO-RS, one series per Ray Data task, into ``<results>/staging/<study_id>/``; an instance
  count that changed between the query and the retrieval (a series still arriving) or a cut-off transfer is
  an error row, retried next night. The staging folder is removed once the study's row is written.
* **Writing back** — the Segmentation and the Structured Report of :mod:`ct3dflow.dicom_results`, stored
  with STOW-RS into the same study as one new series per model version. A result whose (deterministic)
  SOP Instance UID is already in the study is not stored again; a rejected STOW-RS is an error row.

What the job never does: delete, modify or move anything it did not create (it has no code that would).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from ..config import resolve_path

PREFIX = "dicomweb+"
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
MODALITY, N_SERIES_INSTANCES, STUDY_DATE = "00080060", "00201209", "00080020"
IMAGE_TYPE, ORIENTATION = "00080008", "00200037"
SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR


class PacsError(RuntimeError):
    """The PACS cannot be used at all (unreachable, credentials refused): the job stops before writing."""


def _v(item: dict, tag: str, default=None):
    vals = (item.get(tag) or {}).get("Value") or []
    return vals[0] if vals else default


def _hash(*parts: str, n: int = 20) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:n]


@dataclass
class DicomWebSource:
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    lookback_days: int | None = 7
    timeout_s: float = 120.0

    @property
    def name(self) -> str:
        return "dicomweb-" + _hash(self.url, n=12)

    @classmethod
    def from_config(cls, archive: str | None, source: dict | None) -> DicomWebSource:
        """``--archive dicomweb+http://host:port/dicom-web`` and/or a ``source:`` section with ``url``,
        ``credentials_file`` (JSON ``{"username", "password"}``, mode 600) or ``username_env`` /
        ``password_env`` (default ``CT3DFLOW_PACS_USERNAME`` / ``CT3DFLOW_PACS_PASSWORD``), ``lookback_days``."""
        source = dict(source or {})
        # the command line wins over the config, as for every other job argument
        url = (archive[len(PREFIX):] if archive.startswith(PREFIX) else archive) if archive else source.get("url")
        if not url or not url.startswith(("http://", "https://")):
            raise ValueError(f"a DICOMweb source needs an http(s) URL, e.g. --archive {PREFIX}http://pacs:8042/dicom-web")
        if "@" in url.split("//", 1)[1].split("/", 1)[0]:
            raise ValueError("the DICOMweb URL holds credentials; put them in a file (source.credentials_file) or "
                             "the environment (CT3DFLOW_PACS_USERNAME / CT3DFLOW_PACS_PASSWORD), never in the URL: "
                             "job arguments are shown in logs and the Ray dashboard")
        user = pw = None
        if source.get("credentials_file"):
            p = resolve_path(source["credentials_file"])  # relative: against $CT3DFLOW_WORK, as every job path
            if not p.is_file():
                raise FileNotFoundError(f"PACS credentials file {p} not found (source.credentials_file)")
            if p.stat().st_mode & 0o077:
                raise PermissionError(f"PACS credentials file {p} is readable by others: chmod 600 {p}")
            c = json.loads(p.read_text(encoding="utf-8"))
            user, pw = c.get("username"), c.get("password")
        else:
            user = os.environ.get(source.get("username_env") or "CT3DFLOW_PACS_USERNAME")
            pw = os.environ.get(source.get("password_env") or "CT3DFLOW_PACS_PASSWORD")
        look = source.get("lookback_days", 7)
        return cls(url.rstrip("/"), user, pw, None if look is None else int(look), float(source.get("timeout_s", 120)))

    def to_dict(self) -> dict:
        """For Ray tasks (the credentials travel in the task arguments, never in logs or results)."""
        return {"url": self.url, "username": self.username, "password": self.password,
                "lookback_days": self.lookback_days, "timeout_s": self.timeout_s}

    def client(self, retry: bool = True):
        """A DICOMweb client; ``retry`` keeps dicomweb-client's back-off (five attempts over ~30 s), which rides out
        a PACS restart during the night's retrievals but would only delay a start-up check."""
        import requests
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        if self.username is not None:
            session.auth = (self.username, self.password or "")
        client = DICOMwebClient(self.url, session=session)
        client._session.request = _with_timeout(client._session.request, self.timeout_s)
        if not retry:
            client.set_http_retry_params(retry=False)
        return client

    # ------------------------------------------------------------------------------------ queries
    def check(self) -> None:
        """One QIDO-RS request: unreachable or unauthorised → :class:`PacsError` with what to do."""
        import requests

        try:
            self.client(retry=False).search_for_studies(limit=1)  # "at once": an unusable PACS is not retried
        except requests.exceptions.ConnectionError as exc:
            raise PacsError(f"cannot reach the PACS at {self.url} ({type(exc).__name__}): check the URL and that the "
                            "DICOMweb server is running and reachable from the Ray head") from None
        except requests.exceptions.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            if code in (401, 403):
                raise PacsError(f"the PACS at {self.url} refused the credentials (HTTP {code}) for user "
                                f"{self.username!r}: check source.credentials_file or CT3DFLOW_PACS_USERNAME/"
                                "CT3DFLOW_PACS_PASSWORD") from None
            raise PacsError(f"the PACS at {self.url} answered HTTP {code} to a study query: check the DICOMweb "
                            "root (…/dicom-web) and the server's log") from None

    def studies(self, since: date | None) -> list[dict]:
        """QIDO-RS studies (all pages), restricted to StudyDate ≥ ``since`` when given."""
        client = self.client()
        filters = {"StudyDate": f"{since:%Y%m%d}-"} if since else {}
        out, offset, page = [], 0, 500
        while True:
            batch = client.search_for_studies(search_filters=filters, offset=offset, limit=page)
            out += batch
            if len(batch) < page:
                return out
            offset += page


def is_pacs(cfg, archive) -> bool:
    """``--archive dicomweb+…``, or no ``--archive`` and the config's ``source.url``: a folder or manifest given on
    the command line is screened even where the config names a PACS."""
    if archive:
        return str(archive).startswith(PREFIX)
    return bool((cfg.source or {}).get("url"))


def preflight(cfg, archive) -> DicomWebSource | None:
    """The job's PACS, checked (:meth:`DicomWebSource.check`), or None for a folder or manifest archive."""
    if not is_pacs(cfg, archive):
        return None
    source = DicomWebSource.from_config(str(archive) if archive else None, cfg.source)
    source.check()
    return source


def _with_timeout(request, timeout):
    def call(*a, **k):
        k.setdefault("timeout", timeout)
        return request(*a, **k)

    return call


# ----------------------------------------------------------------------------------------- watermark
def watermark_path(results_dir: Path, source: DicomWebSource) -> Path:
    return Path(results_dir) / "sources" / f"{source.name}.json"


def read_watermark(results_dir: Path, source: DicomWebSource) -> dict:
    p = watermark_path(results_dir, source)
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {"last_success": None, "studies": {}}


def write_watermark(results_dir: Path, source: DicomWebSource, studies: dict[str, dict], started: datetime) -> Path:
    """After a successful run only: the run's start time and, per screened study (hashed id), its fingerprint
    and the input key it was scored under (so an unchanged study is skipped without being retrieved)."""
    p = watermark_path(results_dir, source)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps({"url_hash": source.name, "last_success": started.isoformat(timespec="seconds"),
                               "studies": studies}, indent=1), encoding="utf-8")
    os.replace(tmp, p)
    return p


def study_id_of(study_uid: str) -> str:
    """Results name a PACS study by a hash of its UID (UIDs can identify a patient's study)."""
    return "p-" + _hash(study_uid)


def fingerprint(series: list[dict]) -> str:
    """What makes a study's input: its CT series and their instance counts (a changed study is screened again).
    Other series do not count: the SR and SEG this job stores into the study must not make it "changed"."""
    parts = sorted(f"{_v(s, SERIES_UID)}:{_v(s, N_SERIES_INSTANCES)}" for s in series if _v(s, MODALITY) == "CT")
    return _hash(*parts, n=32)


def plan_entries(source: DicomWebSource, results_dir: Path, log=print) -> list[dict]:
    """The studies of the query window as scoring-run entries (``dicomweb`` holds what the retrieval task
    needs; an unchanged study carries the input key it was scored under). Never retrieves pixels."""
    wm = read_watermark(results_dir, source)
    since = None
    if wm.get("last_success") and source.lookback_days is not None:
        since = datetime.fromisoformat(wm["last_success"]).date() - timedelta(days=source.lookback_days)
    client = source.client()
    entries, n_new = [], 0
    studies = source.studies(since)
    for st in studies:
        uid = _v(st, STUDY_UID)
        if not uid:
            continue
        fp = fingerprint(client.search_for_series(uid))
        sid = study_id_of(uid)
        known = wm["studies"].get(sid) or {}
        same = known.get("fingerprint") == fp
        n_new += not same
        entries.append({"entry": sid, "study_id": sid, "path": str(Path(results_dir) / "staging" / sid),
                        "mask_path": "", "error": "", "input_key": known.get("input_key", "") if same else "",
                        "action": "", "part": "", "dicomweb": json.dumps({"study_uid": uid, "fingerprint": fp})})
    log(f"the PACS lists {len(studies)} studies{f' dated {since} or later' if since else ''}; {n_new} new or "
        "changed since the last successful run")
    return entries


def watermark_of(outcomes: dict[str, dict]) -> dict[str, dict]:
    """What the next run needs of this one: the fingerprint and input key of every study that is done."""
    out = {}
    for o in outcomes.values():
        if o.get("status") == "ok" and o.get("input_key") and o.get("dicomweb"):
            out[o["study_id"]] = {"fingerprint": json.loads(o["dicomweb"])["fingerprint"], "input_key": o["input_key"]}
    return out


# ------------------------------------------------------------------------------------------- tasks
def choose_series(client, study_uid: str) -> tuple[str, list[str]]:
    """``(series UID, SOP instance UIDs)`` of the series to screen, by :func:`ct3dflow.io.read_ct`'s rules
    (from WADO-RS metadata: CT, no localizers, axial first, the most images). Raises ``CTInputError``."""
    from ..errors import CTInputError

    series = client.search_for_series(study_uid)
    mods = sorted({str(_v(s, MODALITY, "?")) for s in series})
    ct = [s for s in series if _v(s, MODALITY) == "CT"]
    if not ct:
        raise CTInputError(f"the study holds no CT series (modalities: {', '.join(mods) or 'none'}); CT-3DFlow "
                           "screens chest CT only")
    best, n_loc = None, 0
    for s in ct:
        uid = _v(s, SERIES_UID)
        meta = client.retrieve_series_metadata(study_uid, uid)
        images = []
        for m in meta:
            itype = "\\".join(str(v) for v in (m.get(IMAGE_TYPE) or {}).get("Value", [])).upper()
            if "LOCALIZER" in itype or "SCOUT" in itype:
                n_loc += 1
                continue
            o = np.asarray((m.get(ORIENTATION) or {}).get("Value") or [0.0] * 6, dtype=float)
            axial = o.size == 6 and abs(np.cross(o[:3], o[3:])[2]) > 0.8
            images.append((axial, _v(m, SOP_UID)))
        if not images:
            continue
        rank = (max(a for a, _ in images), len(images))
        if best is None or rank > best[0]:
            best = (rank, uid, [u for _, u in images])
    if best is None:
        raise CTInputError(f"the study's CT series hold only localizer images ({n_loc}); export the axial CT series")
    return best[1], best[2]


def retrieve_item(item: dict, source: dict, plan: dict) -> dict:
    """Ray Data task: skip a study this plan scored under the same input, else choose its series and
    retrieve it (WADO-RS) into the staging folder. Never raises: a failure becomes the item's ``error``.
    The input key is the study's fingerprint, the series and its images (not the bytes: no retrieval needed
    to know a study was screened)."""
    import requests

    from ..detect.batch import ScoringPlan, usable_part_name
    from ..discovery import hash_uids
    from ..pipeline import error_reason

    out = {"action": "", "part": "", **item}  # one schema for every row of the stage
    if item.get("error") or not item.get("dicomweb"):
        return out
    plan_ = ScoringPlan(**plan)
    info = json.loads(item["dicomweb"])
    if item.get("input_key"):
        done = usable_part_name(item, plan_, item["input_key"])
        if done:
            return {**out, "action": "skip", "part": done}
    staging = Path(item["path"])
    try:
        src = DicomWebSource(**source)
        client = src.client()
        series_uid, sops = choose_series(client, info["study_uid"])
        key = _hash(info["fingerprint"], series_uid, *sorted(sops), n=32)
        out["input_key"] = key
        done = usable_part_name(item, plan_, key)
        if done:
            return {**out, "action": "skip", "part": done}
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        instances = client.retrieve_series(info["study_uid"], series_uid)
        wanted = set(sops)
        got = {str(ds.SOPInstanceUID) for ds in instances}
        if not wanted <= got:
            raise RuntimeError(f"the retrieval was cut off or the series is still arriving: {len(wanted & got)} of "
                               f"{len(wanted)} images received; it is retried at the next run")
        for i, ds in enumerate(instances):
            if str(ds.SOPInstanceUID) in wanted:
                ds.save_as(staging / f"IM{i:05d}.dcm", enforce_file_format=True)
        out["dicomweb"] = json.dumps({**info, "series_uid": series_uid, "n_images": len(wanted)})
    except requests.exceptions.RequestException as exc:
        out["error"] = hash_uids(f"retrieving the study from the PACS failed ({type(exc).__name__}: "
                                 f"{str(exc)[:200]}); it is retried at the next run")
    except RuntimeError as exc:
        out["error"] = hash_uids(str(exc))
    except Exception as exc:  # noqa: BLE001 - one broken study becomes one error row
        out["error"] = hash_uids(error_reason(exc))
    return out


def writeback_item(item: dict, source: dict, plan: dict) -> dict:
    """Ray Data task after scoring: build the SEG (flagged studies) and the SR, store them with STOW-RS
    unless this version's SR is already in the study, record their UIDs in the study's result part, and
    remove the staging folder. A rejected STOW-RS makes the row an error (retried next run)."""
    import pandas as pd
    import pydicom

    from ..detect.batch import ScoringPlan, write_part
    from ..discovery import hash_uids

    staging = Path(item["path"])
    base = {**item, "sr_uid": "", "seg_uid": ""}  # one schema for every row of the stage
    try:
        if item.get("action") != "score" or item.get("status") != "ok" or not item.get("dicomweb"):
            return base
        plan_ = ScoringPlan(**plan)
        part = plan_.parts_dir / item["part"]
        row = pd.read_parquet(part).iloc[0].to_dict()
        if row.get("predicted_abnormal") is None or pd.isna(row.get("predicted_abnormal")):
            return base  # scored without an operating point: nothing to report
        info = json.loads(item["dicomweb"])
        source_ds = [pydicom.dcmread(f) for f in sorted(staging.glob("*.dcm"))]
        uids = store_results(DicomWebSource(**source), source_ds, row, plan_, info)
        row.update(uids)
        write_part(plan_.parts_dir, item["part"], row)
        return {**base, "sr_uid": uids["sr_uid"], "seg_uid": uids.get("seg_uid") or ""}
    except Exception as exc:  # noqa: BLE001 - the study's row says what failed; the run goes on
        reason = hash_uids(f"writing the results back to the PACS failed: {exc}"[:400])
        try:
            plan_ = ScoringPlan(**plan)
            part = plan_.parts_dir / item["part"]
            row = pd.read_parquet(part).iloc[0].to_dict()
            row.update(status="error", error=reason)
            write_part(plan_.parts_dir, item["part"], row)
        except Exception:  # noqa: BLE001
            pass
        return {**base, "status": "error", "error": reason}
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def store_results(source: DicomWebSource, source_ds: list, row: dict, plan, info: dict) -> dict:
    """Make and store the SR (and the SEG of a flagged study); returns the UIDs written (or found)."""
    from ..cache import StudyCache
    from ..detect import OperatingPoint, get_kind
    from ..dicom_results import Decision, make_report, make_segmentation, mask_on_source_grid, result_uid

    study_uid = info["study_uid"]
    version = plan.model_version
    series_uid = result_uid("series", study_uid, version)
    key = row.get("input_key") or ""
    sr_uid, seg_uid = result_uid("sr", study_uid, version, key), result_uid("seg", study_uid, version, key)
    client = source.client()
    if client.search_for_instances(study_uid, series_uid, search_filters={"SOPInstanceUID": sr_uid}):
        return {"sr_uid": sr_uid, "seg_uid": "", "results_series_uid": series_uid, "stored": "already"}
    flagged = bool(row["predicted_abnormal"])
    name = version.split("/")[0]
    decision = Decision(flagged, float(row["abnormal_volume_cm3"]), float(row["threshold_cm3"]), plan.kind, name,
                        version)
    seg = None
    if flagged:
        kind, op = get_kind(plan.kind), OperatingPoint.from_dict(plan.operating_point)
        study = StudyCache(plan.cache_dir).load(row["study_id"])
        _, abnormal, _ = kind.decide(kind.load_score(row["score_path"]), study.permissive, study.spacing, op)
        frames = mask_on_source_grid(abnormal, study, source_ds)
        if frames.any():
            seg = make_segmentation(source_ds, frames, decision, series_uid, seg_uid)
    sr = make_report(source_ds, decision, series_uid, sr_uid, seg)
    client.store_instances([d for d in (seg, sr) if d is not None], study_uid)
    return {"sr_uid": sr_uid, "seg_uid": seg_uid if seg is not None else "", "results_series_uid": series_uid,
            "stored": datetime.now(timezone.utc).isoformat(timespec="seconds")}


