"""File names and case discovery in one place (keras_livseg.data.cases)."""

import json
from pathlib import Path

import pytest

from keras_livseg.data.cases import (
    CaseFiles,
    case_key,
    discover_cases,
    lits_id,
    natural_key,
    nifti_files,
    output_names,
    phantom_strata,
    resolve_inputs,
)
from keras_livseg.data.errors import DataError


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_natural_key_orders_numbers_and_never_compares_a_number_with_a_word():
    names = ["10", "b", "2", "a10", "a2", "1b"]
    assert sorted(names, key=natural_key) == ["1b", "2", "10", "a2", "a10", "b"]


def test_every_name_maps_back_to_its_case():
    """The names predict writes are keyed to the same case as the inputs they came from."""
    for image, case_id in [(Path("volume-12.nii.gz"), "12"), (Path("imagesTr/liver_3_0000.nii.gz"), "liver_3"),
                           (Path("scan.nii"), "scan")]:
        label, probabilities = output_names(CaseFiles(case_id, image, None))
        assert case_key(image) == case_key(Path(label)) == case_id
        assert not nifti_files_would_skip(label) and nifti_files_would_skip(probabilities)


def nifti_files_would_skip(name: str) -> bool:
    from keras_livseg.data.cases import is_probability_file

    return is_probability_file(name)


def test_lits_id_reads_only_lits_names():
    assert lits_id("volume-0.nii") == "0"
    assert lits_id("segmentation-7.nii.gz", "segmentation") == "7"
    assert lits_id("volume-.nii") is None and lits_id("myvolume-3.nii") is None and lits_id("volume-3.txt") is None


def test_nifti_files_skip_hidden_and_probability_maps(tmp_path):
    for name in ["segmentation-1.nii.gz", "probabilities-1.nii.gz", ".segmentation-2.nii.gz", "a_probabilities.nii", "b.nii", "c.txt"]:
        _touch(tmp_path / name)
    assert [p.name for p in nifti_files(tmp_path)] == ["b.nii", "segmentation-1.nii.gz"]


def test_discovery_and_inputs_agree_on_case_ids(tmp_path):
    for case in ("2", "10"):
        _touch(tmp_path / "lits" / f"volume-{case}.nii")
        _touch(tmp_path / "lits" / f"segmentation-{case}.nii")
    discovered = discover_cases(tmp_path / "lits")
    assert [c.case_id for c in discovered] == ["2", "10"]
    resolved = resolve_inputs([tmp_path / "lits" / "volume-10.nii"])
    assert resolved == [CaseFiles("10", tmp_path / "lits" / "volume-10.nii", tmp_path / "lits" / "segmentation-10.nii")]
    with pytest.raises(DataError, match="does not exist"):
        resolve_inputs([tmp_path / "missing.nii"])


def test_a_phantom_folder_gives_each_case_its_phase_and_lesion_kind(tmp_path, caplog):
    for i in range(4):
        _touch(tmp_path / f"volume-{i}.nii.gz")
        _touch(tmp_path / f"segmentation-{i}.nii.gz")
    tumors = [[], [{"kind": "hypo"}], [{"kind": "hyper"}, {"kind": "hyper"}], [{"kind": "hypo"}, {"kind": "hyper"}]]
    record = {"cases": [{"id": i, "phase": phase, "tumors": t}
                        for i, (phase, t) in enumerate(zip(["portal", "arterial", "arterial", "delayed"], tumors))]}
    (tmp_path / "phantom.json").write_text(json.dumps(record))
    assert [c.stratum for c in discover_cases(tmp_path)] == [
        "portal/none", "arterial/hypo", "arterial/hyper", "delayed/mixed"]
    _touch(tmp_path / "volume-4.nii.gz")  # a case added since the phantom was written
    _touch(tmp_path / "segmentation-4.nii.gz")
    with caplog.at_level("WARNING"):
        assert [c.stratum for c in discover_cases(tmp_path)] == [None] * 5
    assert "phantom.json does not describe case(s) 4" in caplog.text
    for name in ("volume-4.nii.gz", "segmentation-4.nii.gz"):
        (tmp_path / name).unlink()
    (tmp_path / "phantom.json").unlink()  # a plain LiTS folder names no stratum
    assert [c.stratum for c in discover_cases(tmp_path)] == [None] * 4
    # A damaged record costs the strata, with a warning, not the cases: finding them still works.
    for damaged in ("{not json", json.dumps({"cases": [{"id": 0, "phase": "portal", "tumors": [3]}]}), "[1, 2]"):
        (tmp_path / "phantom.json").write_text(damaged)
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert [c.stratum for c in discover_cases(tmp_path)] == [None] * 4
        assert "phantom.json cannot be read as the phantom's record" in caplog.text and "name no stratum" in caplog.text


def test_a_written_phantom_names_the_strata_its_record_describes(tmp_path):
    from keras_livseg.data.phantom import write_phantom_dataset

    write_phantom_dataset(tmp_path, cases=3, seed=2, size=64, slices=(16, 16))
    meta = {str(c["id"]): c for c in json.loads((tmp_path / "phantom.json").read_text())["cases"]}
    strata = phantom_strata(tmp_path)
    assert set(strata) == set(meta)
    for cid, stratum in strata.items():
        phase, kind = stratum.split("/")
        kinds = {t["kind"] for t in meta[cid]["tumors"]}
        assert phase == meta[cid]["phase"]
        assert kind == ("none" if not kinds else "mixed" if len(kinds) == 2 else kinds.pop())
