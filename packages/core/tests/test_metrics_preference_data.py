"""Round trips and malformed-file errors for the preference-set readers and writers."""

import json

import pytest

from diffalign.core.metrics.preference_data import (
    PreferenceDataError,
    PreferenceRecord,
    read_hpdv2,
    read_imagereward,
    read_preferences,
    read_rapidata,
    records_to_pairs,
    write_hpdv2,
    write_imagereward,
    write_preferences,
    write_rapidata,
)


def _ranked(tmp_path):
    return [
        PreferenceRecord(
            prompt="a red circle",
            images=[tmp_path / "imgs" / f"0_{k}.png" for k in range(3)],
            ranks=[2, 1, 2],
            id="p0",
        ),
        PreferenceRecord(
            prompt="two blue squares",
            images=[tmp_path / "imgs" / f"1_{k}.png" for k in range(2)],
            ranks=[1, 2],
            id="p1",
            extra={"user_hash": ["u1", "u2"]},
        ),
    ]


def _voted(tmp_path):
    return [
        PreferenceRecord(
            prompt="a red circle",
            images=[tmp_path / "a.png", tmp_path / "sub" / "b.png"],
            votes=[7, 3],
            models=["teacher", "student"],
            extra={"detailed_results": "[]"},
        ),
        PreferenceRecord(
            prompt="a green square", images=[tmp_path / "c.png", tmp_path / "d.png"], votes=[5, 5]
        ),
    ]


def test_imagereward_round_trip_and_layout(tmp_path):
    records = _ranked(tmp_path)
    path = write_imagereward(tmp_path / "test.json", records)
    raw = json.loads(path.read_text())
    assert raw[0] == {
        "id": "p0",
        "prompt": "a red circle",
        "generations": ["imgs/0_0.png", "imgs/0_1.png", "imgs/0_2.png"],
        "ranking": [2, 1, 2],
    }
    assert read_imagereward(path) == records


def test_imagereward_reads_reference_style_file_with_separate_image_root(tmp_path):
    (tmp_path / "data").mkdir()
    entry = {
        "id": "005658-0040",
        "prompt": "p",
        "generations": ["part/a.webp", "part/b.webp"],
        "ranking": [1, 2],
    }
    (tmp_path / "data" / "test.json").write_text(json.dumps([entry]))
    (record,) = read_imagereward(
        tmp_path / "data" / "test.json", image_root=tmp_path / "data" / "test_images"
    )
    assert record.images[0] == tmp_path / "data" / "test_images" / "part" / "a.webp"
    assert record.ranks == [1, 2] and record.id == "005658-0040"


def test_hpdv2_round_trip_keeps_extra_keys(tmp_path):
    records = _ranked(tmp_path)
    path = write_hpdv2(tmp_path / "hpd" / "test.json", records, image_root=tmp_path)
    raw = json.loads(path.read_text())
    assert raw[1]["image_path"] == ["imgs/1_0.png", "imgs/1_1.png"]
    assert raw[1]["rank"] == [1, 2] and raw[1]["user_hash"] == ["u1", "u2"]
    assert read_hpdv2(path, image_root=tmp_path) == records


def test_rapidata_round_trip_counts_and_weighted(tmp_path):
    records = _voted(tmp_path)
    path = write_rapidata(tmp_path / "prefs.jsonl", records)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["image2_path"] == "sub/b.png"
    assert rows[0]["votes_image1"] == 7 and rows[0]["votes_image2"] == 3
    assert rows[0]["model1"] == "teacher" and rows[0]["detailed_results"] == "[]"
    assert read_rapidata(path) == records

    weighted = [
        PreferenceRecord(
            prompt="x",
            images=[tmp_path / "a.png", tmp_path / "b.png"],
            votes=[0.25, 0.75],
            vote_kind="weighted",
        )
    ]
    wpath = write_preferences(tmp_path / "w.jsonl", weighted, "rapidata")
    row = json.loads(wpath.read_text())
    assert row["weighted_results_image1_preference"] == 0.25 and "votes_image1" not in row
    assert read_preferences(wpath, "rapidata") == weighted


def test_rapidata_reads_parquet_with_hub_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.Table.from_pylist(
        [
            {
                "prompt": "p",
                "image1": {"bytes": None, "path": "x.png"},
                "image2": {"bytes": None, "path": "y.png"},
                "votes_image1": 1,
                "votes_image2": 4,
                "model1": "m1",
                "model2": "m2",
                "detailed_results": "[]",
            }
        ]
    )
    pq.write_table(table, tmp_path / "train.parquet")
    (record,) = read_rapidata(tmp_path / "train.parquet")
    assert record.images == [tmp_path / "x.png", tmp_path / "y.png"] and record.votes == [1, 4]
    assert record.to_pairs()[0].label == 1


def test_to_pairs_from_ranks_and_votes_drops_ties(tmp_path):
    ranked = _ranked(tmp_path)
    pairs = ranked[0].to_pairs()
    # ranks [2, 1, 2]: (0,1) -> image 1 wins, (0,2) tie dropped, (1,2) -> image 1 wins
    assert [(p.index_a, p.index_b, p.label) for p in pairs] == [(0, 1, 1), (1, 2, 0)]
    voted = _voted(tmp_path)
    assert [(p.label, p.strength_a, p.strength_b) for p in voted[0].to_pairs()] == [(0, 7.0, 3.0)]
    assert voted[1].to_pairs() == []
    assert len(records_to_pairs(ranked)) == 3


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("{}", "expected a JSON array"),
        ("[]", "holds no entries"),
        (json.dumps([{"prompt": "p", "generations": ["a", "b"]}]), "missing key(s) ['ranking']"),
        (
            json.dumps([{"prompt": "p", "generations": ["a", "b"], "ranking": [1]}]),
            "'ranks' has 1 entries for 2",
        ),
        (json.dumps([{"prompt": "p", "generations": ["a"], "ranking": [1]}]), "at least 2 images"),
        (json.dumps([{"prompt": "p", "generations": "a", "ranking": [1]}]), "'generations' must be a list"),
        (json.dumps([{"prompt": "p", "generations": ["a", 3], "ranking": [1, 2]}]), "non-empty path strings"),
        (json.dumps([{"prompt": "p", "generations": ["a", "b"], "ranking": [1, "x"]}]), "finite numbers"),
    ],
)
def test_imagereward_malformed_files_raise_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PreferenceDataError) as info:
        read_imagereward(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_malformed_rapidata_and_missing_files(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"prompt": "p", "image1_path": "a", "image2_path": "b", "votes_image1": 1}) + "\n"
    )
    with pytest.raises(PreferenceDataError, match="needs either"):
        read_rapidata(path)
    path.write_text('{"prompt": "p"}\nnot-json\n')
    with pytest.raises(PreferenceDataError, match="line 2 is not valid JSON"):
        read_rapidata(path)
    with pytest.raises(PreferenceDataError, match="not found"):
        read_hpdv2(tmp_path / "nope.json")
    with pytest.raises(PreferenceDataError, match="unknown preference format"):
        read_preferences(path, "pickapic")


def test_check_images_reports_missing_image(tmp_path):
    path = write_hpdv2(tmp_path / "t.json", _ranked(tmp_path))
    with pytest.raises(PreferenceDataError, match="does not exist"):
        read_hpdv2(path, check_images=True)


def test_writers_validate_before_writing_and_leave_nothing(tmp_path):
    with pytest.raises(PreferenceDataError, match="needs 'ranks'"):
        write_imagereward(tmp_path / "ir.json", _voted(tmp_path))
    with pytest.raises(PreferenceDataError, match="exactly 2 images"):
        write_rapidata(tmp_path / "r.jsonl", _ranked(tmp_path))
    with pytest.raises(PreferenceDataError, match="empty"):
        write_hpdv2(tmp_path / "h.json", [])
    with pytest.raises(PreferenceDataError, match=".jsonl"):
        write_rapidata(tmp_path / "r.json", _voted(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_record_validation():
    with pytest.raises(PreferenceDataError, match="exactly one"):
        PreferenceRecord(prompt="p", images=["a", "b"])
    with pytest.raises(PreferenceDataError, match=">= 0"):
        PreferenceRecord(prompt="p", images=["a", "b"], votes=[-1, 2])
    with pytest.raises(PreferenceDataError, match="integers"):
        PreferenceRecord(prompt="p", images=["a", "b"], ranks=[1.5, 2])


def test_ranked_formats_write_ids_their_own_way(tmp_path):
    # ImageReward: an id on every entry, first, "{index:06d}" when the record has none;
    # HPDv2: an id only when the record has one, after the prompt
    records = [
        PreferenceRecord(
            prompt="a red circle", images=[tmp_path / "a.png", tmp_path / "b.png"], ranks=[1, 2]
        ),
        PreferenceRecord(
            prompt="a blue square", images=[tmp_path / "c.png", tmp_path / "d.png"], ranks=[2, 1], id="q7"
        ),
    ]
    ir = json.loads(write_imagereward(tmp_path / "ir.json", records).read_text())
    assert [list(e) for e in ir] == [["id", "prompt", "generations", "ranking"]] * 2
    assert [e["id"] for e in ir] == ["000000", "q7"]
    hp = json.loads(write_hpdv2(tmp_path / "hp.json", records).read_text())
    assert [list(e) for e in hp] == [["prompt", "image_path", "rank"], ["prompt", "id", "image_path", "rank"]]
    assert hp[1]["id"] == "q7"
    assert [r.id for r in read_hpdv2(tmp_path / "hp.json")] == [None, "q7"]
