"""The DICOMweb pieces that need no server: multipart answers, DICOM JSON metadata read into the same header facts
as a file's, SOP UIDs read from a file's bytes, filters and addresses checked before any request."""

from __future__ import annotations

import io
from dataclasses import asdict, replace
from pathlib import Path

import pydicom
import pytest
from dicom_factory import SeriesSpec, head_slices, make_dataset, write_series
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from hctembed.io import dicomweb
from hctembed.io.dicom_headers import header_of
from hctembed.io.dicomweb_series import dataset_of, sop_instance_uid
from hctembed.io.multipart import split_multipart
from hctembed.io.sources import open_source

PHILIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dcm_qa_ct_philips"


def _enhanced(spec: SeriesSpec) -> Dataset:
    ds = make_dataset(replace(spec, sop_class="1.2.840.10008.5.1.4.1.1.2.1"), k=0, pixels_hu=head_slices(n=1)[0])
    del ds.ImageOrientationPatient, ds.PixelSpacing
    shared, orient, measures = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = list(spec.orientation)
    measures.PixelSpacing = [spec.spacing, spec.spacing]
    measures.SliceThickness = spec.thickness
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.NumberOfFrames = 1
    return ds


def test_metadata_json_gives_the_header_facts_of_the_file_itself(tmp_path):
    files = write_series(tmp_path / "s", SeriesSpec(n=3, body_part="HEAD", series_description="AX 5MM"))
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in files] + [_enhanced(SeriesSpec())]
    if PHILIPS.is_dir():  # a real scanner's: 125 elements, private tags included
        datasets += [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(PHILIPS.rglob("I*"))[:6]]
    for ds in datasets:
        metadata = ds.to_json_dict(bulk_data_threshold=1, bulk_data_element_handler=lambda element: "bulk")
        from_file, from_json = asdict(header_of(ds, file="f")), asdict(header_of(dataset_of(metadata), file="f"))
        from_file.pop("transfer_syntax"), from_json.pop("transfer_syntax")  # not in a PACS's metadata
        assert from_json == from_file
    assert header_of(datasets[-1 if not PHILIPS.is_dir() else 3], file="f").pixel_spacing is not None


def test_sop_instance_uid_is_read_from_the_bytes_as_pydicom_reads_it(tmp_path):
    files = write_series(tmp_path / "s", SeriesSpec(n=2))
    if PHILIPS.is_dir():
        files += sorted(PHILIPS.rglob("I*"))[:4]
    for path in files:
        blob = path.read_bytes()
        assert sop_instance_uid(blob) == pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True).SOPInstanceUID
    assert sop_instance_uid(b"not dicom at all") is None


def test_multipart_answers_are_split_with_and_without_content_length():
    body = (b"--xyz\r\nContent-Type: application/dicom\r\nContent-Length: 5\r\n\r\nab\r\nc\r\n--xyz\r\n"
            b"Content-Type: application/dicom\r\n\r\nsecond\r\n--xyz--\r\n")  # fmt: skip
    assert split_multipart(body, boundary="xyz") == [b"ab\r\nc", b"second"]
    with pytest.raises(Exception, match="truncated"):
        split_multipart(body[:60], boundary="xyz")


def test_filters_and_addresses_are_checked_before_the_server_is_asked(tmp_path):
    with pytest.raises(Exception, match="KEY=VALUE"):
        open_source("dicomweb+http://127.0.0.1:9/dicom-web", filters=("Modality",))
    with pytest.raises(Exception, match="YYYY-MM-DD"):
        open_source("dicomweb+http://127.0.0.1:9/dicom-web", since="yesterday")
    with pytest.raises(Exception, match="dicomweb"):
        open_source("http://127.0.0.1:9/dicom-web")
    with pytest.raises(Exception, match="port is not a number"):
        open_source("dicomweb+http://127.0.0.1:abc/dicom-web")
    source = open_source("dicomweb+http://127.0.0.1:9/dicom-web", filters=("Modality=CT", "StudyDate=2024-"))
    assert source.kind == "dicomweb" and source.describe() == "dicomweb+http://127.0.0.1:9/dicom-web"
    with pytest.raises(Exception, match="did not answer"):  # nothing listens on port 9: retried, then one line
        quick = dicomweb.Retry(attempts=2, backoff_seconds=0.01, timeout_seconds=1)
        with dicomweb.DicomWebClient(replace(source.server), retry=quick) as client:
            list(client.studies({}))


def test_a_server_answering_something_else_than_dicom_json_is_one_error_not_a_traceback():
    """An HTML page (a web server at the address, not DICOMweb) is refused by name."""
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<html>a login page</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        source = open_source(f"dicomweb+http://127.0.0.1:{server.server_address[1]}/dicom-web")
        with dicomweb.DicomWebClient(source.server) as client, pytest.raises(Exception, match="not a DICOM JSON list"):
            list(client.studies({}))
    finally:
        server.shutdown()
        server.server_close()
