import shlex

from data_pipeline.config import path_slug, run_slug


def test_path_slug_makes_one_safe_directory_name():
    assert path_slug("model-tiny+seed-1") == "model-tiny+seed-1"
    assert path_slug("data.dir=/tmp/x y,seed=1") == "data.dir_tmp_x_y_seed_1"
    assert path_slug("") == "default"
    long_a, long_b = "a=" + "x" * 300, "a=" + "x" * 299 + "y"
    assert len(path_slug(long_a)) == 96 and path_slug(long_a) != path_slug(long_b)


def test_run_names_need_no_shell_quoting():
    single = run_slug(["seed=2", "model=tiny", "run_dir=x"], argv=["model=tiny", "seed=2"])
    assert single == "model-tiny+seed-2"  # sorted; run_dir does not name a run
    job = run_slug(["optim=wsd_short", "mask=cosine", "seed=2"], argv=["-m", "optim=wsd_short", "mask=linear,cosine",
                                                                       "seed=1,2"])
    assert job == "optim-wsd_short/mask-cosine+seed-2"  # shared / varied
    assert run_slug(["trainer.betas=[0.9,0.95]"], argv=[]) == "trainer.betas-_0.9_0.95"
    for name in (single, job):
        assert shlex.quote(name) == name
