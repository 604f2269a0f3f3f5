"""DICOM decoding against hand computations, and the no-identifiers rule."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from medpeft.data.dicom import (apply_window, dicom_group_ids, hash_identifier, parse_window,  # noqa: E402
                                read_dicom)
from medpeft.data.io import read_image  # noqa: E402
from medpeft.errors import ConfigError, DataError  # noqa: E402

PATIENT_NAME = "Doe^Janet"
PATIENT_ID = "PID-7731-SECRET"
STUDY_UID = "1.2.826.0.1.3680043.8.498.424242"


def write_dicom(path, pixels: np.ndarray, photometric="MONOCHROME2", signed=False, bits=16, frames=1,
                patient_id=PATIENT_ID, study_uid=STUDY_UID, **attrs) -> str:
    """A minimal uncompressed DICOM image written by pydicom itself."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT_NAME
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    rgb = photometric == "RGB"
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = photometric
    if rgb:
        ds.PlanarConfiguration = 0
    shape = pixels.shape[1:] if frames > 1 else pixels.shape
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[(bits, signed)]
    ds.PixelData = np.ascontiguousarray(pixels.astype(dtype)).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def linear(x, c, w):
    """DICOM PS3.3 C.11.2.1.2.1 by hand, for one value."""
    if x <= c - 0.5 - (w - 1) / 2:
        return 0
    if x > c - 0.5 + (w - 1) / 2:
        return 255
    return int(np.floor(((x - (c - 0.5)) / (w - 1) + 0.5) * 255 + 0.5))


def test_16bit_monochrome2_min_max_without_window(tmp_path):
    stored = np.array([[0, 1000], [2000, 4000]])
    path = write_dicom(tmp_path / "a.dcm", stored)
    out = read_dicom(path)
    assert out.dtype == np.uint8 and out.shape == (2, 2)
    # min-max: (x - 0) / 4000 * 255, rounded half up: 0, 63.75 -> 64, 127.5 -> 128, 255
    assert out.tolist() == [[0, 64], [128, 255]]


def test_slope_intercept_signed_and_file_window_exact(tmp_path):
    # CT-like: signed stored values, HU = 2 * stored - 1024, window C=40 W=400 (soft tissue)
    stored = np.array([[-100, 400], [500, 532], [560, 900]])
    path = write_dicom(tmp_path / "ct.dcm", stored, signed=True, RescaleSlope="2", RescaleIntercept="-1024",
                       WindowCenter="40", WindowWidth="400")
    hu = stored * 2 - 1024  # [-1224, -224, -24, 40, 96, 776]
    expected = [[linear(v, 40, 400) for v in row] for row in hu]
    assert read_dicom(path).tolist() == expected
    assert expected == [[0, 0], [87, 128], [164, 255]]


def test_window_values_above_8_bits_are_not_clipped_before_windowing(tmp_path):
    # 12-bit values windowed high: a premature clip to 0..255 would turn them all black or white
    stored = np.array([[3000, 3500, 4000, 4095]])
    path = write_dicom(tmp_path / "w.dcm", stored, WindowCenter="3500", WindowWidth="1001")
    assert read_dicom(path).tolist() == [[linear(v, 3500, 1001) for v in stored[0]]]
    assert read_dicom(path).tolist() == [[0, 128, 255, 255]]


def test_explicit_window_overrides_file_and_multivalued_window_uses_first(tmp_path):
    stored = np.array([[0, 50, 100, 150, 200]])
    path = write_dicom(tmp_path / "m.dcm", stored, WindowCenter=["100", "1000"], WindowWidth=["101", "5"])
    assert read_dicom(path).tolist() == [[linear(v, 100, 101) for v in stored[0]]]
    assert read_dicom(path, window=(50, 11)).tolist() == [[linear(v, 50, 11) for v in stored[0]]]
    assert read_dicom(path, window="50,11").tolist() == read_dicom(path, window=(50, 11)).tolist()


def test_monochrome1_is_inverted(tmp_path):
    stored = np.array([[0, 100], [200, 400]])
    m2 = read_dicom(write_dicom(tmp_path / "m2.dcm", stored))
    m1 = read_dicom(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"))
    assert (m1.astype(int) + m2.astype(int) == 255).all()
    assert m1.tolist() == [[255, 191], [127, 0]]


def test_rgb_passes_through(tmp_path):
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 7
    path = write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB", bits=8)
    out = read_dicom(path)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)
    np.testing.assert_array_equal(read_image(path), rgb)  # through the generic reader too


def test_multiframe_middle_all_and_index(tmp_path):
    frames = np.stack([np.full((2, 2), v) for v in (0, 100, 200)]) + np.array([[0, 0], [0, 10]])
    path = write_dicom(tmp_path / "mf.dcm", frames, frames=3, WindowCenter="105", WindowWidth="11")
    middle = read_dicom(path)
    assert middle.shape == (2, 2)
    low, high = linear(100, 105, 11), linear(110, 105, 11)
    assert middle.tolist() == [[low, low], [low, high]]
    assert middle.tolist() == [[13, 13], [13, 255]]
    everything = read_dicom(path, frame="all")
    assert everything.shape == (3, 2, 2)
    np.testing.assert_array_equal(everything[1], middle)
    np.testing.assert_array_equal(read_dicom(path, frame=2), everything[2])
    np.testing.assert_array_equal(read_image(path), middle)  # io.read_image: the middle frame
    with pytest.raises(ConfigError, match="out of range"):
        read_dicom(path, frame=3)


def test_apply_window_formulas():
    x = np.array([-10.0, 0.0, 5.0, 10.0])
    assert apply_window(x, None).tolist() == [0, 128, 191, 255]  # (x+10)/20*255: 127.5 -> 128, 191.25
    assert apply_window(x, (0, 1)).tolist() == [0, 255, 255, 255]  # width 1: threshold at c - 0.5
    assert apply_window(x, (0, 20), "LINEAR_EXACT").tolist() == [0, 128, 191, 255]
    sig = apply_window(np.array([0.0]), (0, 10), "SIGMOID")
    assert sig.tolist() == [128]  # 255 / 2 = 127.5 -> 128
    assert apply_window(np.full(3, 7.0), None).tolist() == [0, 0, 0]  # flat image: no division by 0


def test_parse_window_errors():
    assert parse_window("40,400") == (40.0, 400.0)
    assert parse_window(None) is None
    for bad in ("40", "a,b", "40,0", "40,-5", (1, 2, 3)):
        with pytest.raises(ConfigError, match="window"):
            parse_window(bad)


def test_not_dicom_and_no_pixel_data_raise_data_error_naming_the_file(tmp_path):
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"this is not a dicom file at all" * 10)
    with pytest.raises(DataError, match="fake.dcm"):
        read_dicom(fake)
    with pytest.raises(DataError, match="fake.dcm"):
        read_image(fake)
    with pytest.raises(DataError, match="missing.dcm"):
        read_dicom(tmp_path / "missing.dcm")
    # a valid DICOM header without pixels
    path = write_dicom(tmp_path / "nopix.dcm", np.zeros((2, 2)))
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(DataError, match="nopix.dcm.*no pixel data"):
        read_dicom(path)


def test_group_ids_are_salted_hashes_never_raw_ids(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDPEFT_GROUP_SALT", raising=False)
    a = write_dicom(tmp_path / "a.dcm", np.zeros((2, 2)))
    b = write_dicom(tmp_path / "b.dcm", np.ones((2, 2)), study_uid="1.2.3.4")
    c = write_dicom(tmp_path / "c.dcm", np.ones((2, 2)), patient_id="OTHER-1")
    ga, gb, gc = dicom_group_ids(a), dicom_group_ids(b), dicom_group_ids(c)
    assert ga["patient"] == gb["patient"] != gc["patient"]  # same patient, same group
    assert ga["study"] != gb["study"]
    assert ga["group"] == ga["patient"] and ga["patient"].startswith("patient-") and len(ga["patient"]) == 24
    assert ga["patient"] == hash_identifier(PATIENT_ID, "patient")
    assert PATIENT_ID not in json.dumps(ga) and STUDY_UID not in json.dumps(ga)
    monkeypatch.setenv("MEDPEFT_GROUP_SALT", "site-secret")
    assert dicom_group_ids(a)["patient"] != ga["patient"]  # the salt changes the hash


def test_no_identifiers_in_outputs_logs_or_loaded_data(tmp_path, caplog, capsys):
    """Reading, hashing, a whole load_data of a .dcm folder and its audit never show patient ids."""
    from medpeft.audit import audit_dataset
    from medpeft.data import DataConfig, load_data

    root = tmp_path / "dicoms"
    rng = np.random.default_rng(0)
    for cls in ("benign", "malignant"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            write_dicom(root / cls / f"img{i}.dcm", rng.integers(0, 4096, (8, 8)), WindowCenter="2048",
                        WindowWidth="4096", patient_id=f"{PATIENT_ID}-{i}")
    caplog.set_level(logging.DEBUG)
    outputs = []
    for path in sorted(root.rglob("*.dcm")):
        outputs.append(read_dicom(path).tobytes().hex())
        outputs.append(json.dumps(dicom_group_ids(path)))
    bundle = load_data(DataConfig(name=str(root), image_size=8, val_ratio=0.25, test_ratio=0.25))
    outputs += [json.dumps(bundle.split_info), *bundle.train.ids, *bundle.val.ids, *bundle.test.ids]
    report = audit_dataset(str(root))
    outputs += [report.to_json(), report.summary_text()]
    report_bundle = audit_dataset(bundle)
    outputs += [report_bundle.to_json(), report_bundle.summary_text()]
    captured = capsys.readouterr()
    outputs += [captured.out, captured.err, caplog.text]
    text = "\n".join(outputs)
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 8
    for secret in (PATIENT_ID, PATIENT_NAME, "Janet", STUDY_UID):
        assert secret not in text
    assert os.path.basename(str(root)) in report.to_json()  # the report itself was produced


def test_dicom_split_groups(tmp_path):
    from medpeft.data.dicom import dicom_split_groups

    a = write_dicom(tmp_path / "a.dcm", np.zeros((2, 2)))
    b = write_dicom(tmp_path / "b.dcm", np.zeros((2, 2)))
    c = write_dicom(tmp_path / "c.dcm", np.zeros((2, 2)), patient_id="", study_uid="1.2.3")
    d = write_dicom(tmp_path / "d.dcm", np.zeros((2, 2)), patient_id="", study_uid="")
    png = tmp_path / "e.png"
    png.write_bytes(b"")
    groups = dicom_split_groups([a, b, c, d, str(png)])
    assert groups[0] == groups[1] == hash_identifier(PATIENT_ID, "patient")
    assert groups[2] == hash_identifier("1.2.3", "study")
    assert groups[3:] == ["file-000003", "file-000004"]
    assert dicom_split_groups([d, str(png)]) is None
