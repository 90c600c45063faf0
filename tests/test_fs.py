from cwps_lightning.fs import file_in_the_way


def test_file_in_the_way(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert file_in_the_way(a_file) == a_file
    assert file_in_the_way(a_file / "below" / "deeper") == a_file
    assert file_in_the_way(tmp_path) is None
    assert file_in_the_way(tmp_path / "not" / "yet") is None  # (can be made)
    assert file_in_the_way(str(a_file / "x")) == a_file  # (a string path too)
