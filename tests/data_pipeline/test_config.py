from data_pipeline.config import path_slug


def test_path_slug_makes_one_safe_directory_name():
    assert path_slug("model=tiny,seed=1") == "model=tiny,seed=1"
    assert path_slug("data.dir=/tmp/x y,seed=1") == "data.dir=_tmp_x_y,seed=1"
    assert path_slug("") == "default"
    long_a, long_b = "a=" + "x" * 300, "a=" + "x" * 299 + "y"
    assert len(path_slug(long_a)) == 96 and path_slug(long_a) != path_slug(long_b)
