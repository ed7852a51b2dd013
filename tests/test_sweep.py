"""Sweeps (vae_core/sweep.py, sweep_exec.py): the grid, a local sweep, an interrupted one resumed, Ray Tune.

The sweeps train real tiny runs in `python -m vae_core train` processes (512 sprites, batch 64, a
64-unit MLP), so they are marked slow; nothing here depends on how fast the machine is.
"""
from __future__ import annotations

import json
import sys
import threading

import pytest

from tests.helpers import poll_until
from vae_core import cli, runs, sweep
from vae_core.config import ConfigError, RunConfig
from vae_core.lab import Lab
from vae_core.sweep_exec import RAY_HINT, run_sweep


def tiny_base(epochs: int = 1) -> RunConfig:
    return RunConfig().replace(dataset="sprites", epochs=epochs, train_size=512, batch_size=64, hidden_dim=64,
                               evidence_every=0)


def test_grid_expands_to_named_points_and_refuses_bad_values():
    g = sweep.make_grid("0.25, 1,4", "2,8,32", 2, first_seed=5)
    pts = g.points("s1")
    assert len(pts) == 3 * 3 * 2
    assert pts[0] == sweep.Point("s1-b0.25-z2-s5", 0.25, 2, 5)
    assert {p.name for p in pts} == {f"s1-b{b:g}-z{d}-s{s}" for b in (0.25, 1, 4) for d in (2, 8, 32) for s in (5, 6)}
    assert sweep.make_grid([1.0, 1.0], [8], 1).points("x")[0].name == "x-b1-z8"  # duplicates once; no seed suffix
    cfg = pts[-1].config(tiny_base())
    assert (cfg.train.beta, cfg.model.latent_dim, cfg.train.seed, cfg.model.hidden_dim) == (4.0, 32, 6, 64)
    for betas, dims, seeds, why in (("1,x", "2", 1, "not a number"), ("", "2", 1, "at least one"),
                                    ("1", "2.5", 1, "whole"), ("-1", "2", 1, "beta must be between"),
                                    ("1", "0", 1, "latent_dim must be between"), ("1", "2", 0, "seeds"),
                                    ("1", "2", 500, "at most")):
        with pytest.raises(ConfigError, match=why):
            sweep.make_grid(betas, dims, seeds)


def test_runs_without_a_sweep_still_load_and_a_bad_sweep_field_is_named(runs_dir):
    runs_dir.mkdir()
    for name, extra in (("old", {}), ("bad", {"sweep": [1, 2]}), ("member", {"sweep": {"id": "s9", "grid": {}}})):
        (runs_dir / name).mkdir()
        (runs_dir / name / runs.CONFIG).write_text(json.dumps({**RunConfig().to_dict(), **extra}))
    rows = {r.name: r for r in runs.list_runs(runs_dir)}
    assert rows["old"].error is None and rows["old"].sweep is None
    assert rows["member"].error is None and rows["member"].sweep == "s9"
    assert rows["bad"].error is not None and "sweep" in rows["bad"].error


def test_ray_executor_without_ray_says_how_to_install_it(runs_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    code = cli.main(["sweep", "--executor", "ray", "--beta", "1", "--latent-dim", "2", "--runs-dir", str(runs_dir)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and 'pip install -e ".[cluster]"' in err and RAY_HINT in err
    assert not runs_dir.exists()  # nothing written


@pytest.mark.slow
def test_local_sweep_2x2_makes_four_runs_of_one_sweep(grid_sweep):
    # grid_sweep (conftest): `sweep --beta 0.5,2 --latent-dim 2,4 --name grid --workers 2` with tiny settings,
    # run once per session by cli.main in this process; test_sweeps_browser shows the same sweep on the page.
    runs_dir = grid_sweep.runs_dir
    assert grid_sweep.code == 0, grid_sweep.err
    assert "4 of 4 runs finished" in grid_sweep.out
    dirs = sorted(p.name for p in runs_dir.iterdir() if not p.name.startswith("."))
    assert dirs == ["grid-b0.5-z2", "grid-b0.5-z4", "grid-b2-z2", "grid-b2-z4"]
    for d in dirs:
        raw = json.loads((runs_dir / d / runs.CONFIG).read_text())
        assert raw["sweep"]["id"] == "grid"
        assert raw["sweep"]["grid"] == {"beta": [0.5, 2.0], "latent_dim": [2, 4], "seed": [0]}
        assert (raw["train"]["beta"], raw["model"]["latent_dim"]) == (raw["sweep"]["point"]["beta"],
                                                                     raw["sweep"]["point"]["latent_dim"])
        assert (raw["train"]["epochs"], raw["train"]["train_size"], raw["model"]["hidden_dim"]) == (1, 512, 64)
    listed = Lab(runs_dir).list_runs()
    assert sorted(r.name for r in listed if r.sweep == "grid") == dirs
    assert all(r.status == "finished" for r in listed)
    st = Lab(runs_dir).sweep_status("grid")
    assert st.state == "finished" and st.count("finished") == 4
    for p in st.points:  # each point's numbers are its own run's last test row
        last = runs.read_metrics_tail(runs_dir / p.name)[-1]
        assert (p.test_elbo, p.kl, p.active_units) == (last["elbo"], last["kl"], last["active_units"])
        assert p.test_elbo == pytest.approx(p.recon - p.kl, abs=1e-3)
    assert [s.id for s in Lab(runs_dir).list_sweeps()] == ["grid"]


@pytest.mark.slow
def test_interrupted_sweep_resumes_only_the_missing_runs(runs_dir):
    grid = sweep.make_grid("0.5,2", "2", 1)
    sid = sweep.create_sweep(runs_dir, tiny_base(epochs=2), grid, sweep_id="cut")["id"]
    names = [p.name for p in grid.points(sid)]
    first = threading.Thread(target=run_sweep, args=(runs_dir, sid), kwargs={"workers": 1})
    first.start()
    done = poll_until(lambda: [n for n in names if sweep.point_finished(runs_dir, n)], what="a first run to finish")
    sweep.request_cancel(runs_dir, sid)
    first.join(120)
    assert not first.is_alive()
    st = sweep.sweep_status(runs_dir, sid)
    assert st.state == "cancelled"
    finished = [p.name for p in st.points if p.state == "finished"]
    assert set(done) <= set(finished) and len(finished) == 1, [(p.name, p.state) for p in st.points]
    kept = {n: ((runs_dir / n / runs.METRICS).read_bytes(), (runs_dir / n / runs.CHECKPOINT).stat().st_mtime_ns,
                (sweep.sweep_dir(runs_dir, sid) / f"{n}.log").read_bytes())
            for n in finished}

    results = run_sweep(runs_dir, sid, workers=1)  # the resume: only what is missing
    assert set(results) == set(names) - set(finished)
    assert all(s == "finished" for s in results.values())
    st = sweep.sweep_status(runs_dir, sid)
    assert st.state == "finished" and st.count("finished") == 2
    for n, (metrics, mtime, log) in kept.items():  # the runs that had finished were not trained again
        assert (runs_dir / n / runs.METRICS).read_bytes() == metrics
        assert (runs_dir / n / runs.CHECKPOINT).stat().st_mtime_ns == mtime
        assert (sweep.sweep_dir(runs_dir, sid) / f"{n}.log").read_bytes() == log
    for p in st.points:
        assert runs.read_status(runs_dir / p.name)["epochs_done"] == 2


@pytest.mark.slow
def test_ray_executor_trains_the_grid_on_a_local_ray_cluster(runs_dir):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": sweep.source_root()}})
    try:
        grid = sweep.make_grid("0.5,2", "2", 1)
        sid = sweep.create_sweep(runs_dir, tiny_base(), grid, sweep_id="onray")["id"]
        results = run_sweep(runs_dir, sid, executor="ray", cpus_per_run=1, retries=1)
    finally:
        ray.shutdown()
    assert results == {"onray-b0.5-z2": "finished", "onray-b2-z2": "finished"}
    st = sweep.sweep_status(runs_dir, sid)
    assert st.state == "finished" and all(p.test_elbo is not None for p in st.points)
    assert {r.name for r in runs.list_runs(runs_dir) if r.sweep == "onray"} == set(results)


@pytest.mark.slow
def test_a_failing_run_is_retried_then_reported_and_the_others_finish(runs_dir):
    grid = sweep.make_grid("0.5,2", "2", 1)
    sid = sweep.create_sweep(runs_dir, tiny_base(), grid, sweep_id="bad")["id"]
    broken = runs_dir / f"{sid}-b2-z2"  # a run whose checkpoint is garbage: every attempt to resume it fails
    broken.mkdir()
    (broken / runs.CONFIG).write_text(json.dumps(tiny_base().replace(beta=2.0, latent_dim=2).to_dict()))
    (broken / runs.CHECKPOINT).write_bytes(b"not a checkpoint")
    said = []
    results = run_sweep(runs_dir, sid, workers=1, retries=1, say=said.append)
    assert results == {f"{sid}-b0.5-z2": "finished", f"{sid}-b2-z2": "failed"}
    log = (sweep.sweep_dir(runs_dir, sid) / f"{sid}-b2-z2.log").read_text()
    assert log.count("error:") == 2  # the first attempt and one retry, each one line
    assert any("retrying (1 of 1)" in m for m in said)
    st = sweep.sweep_status(runs_dir, sid)
    assert st.state == "failed" and f"{sid}-b2-z2" in st.message


def test_resume_keeps_the_sweeps_executor_unless_told_otherwise(runs_dir, monkeypatch, capsys):
    sweep.create_sweep(runs_dir, tiny_base(), sweep.make_grid("1", "2"), sweep_id="onray",
                       options={"executor": "ray", "cpus_per_run": 2, "gpus_per_run": 0.25})
    monkeypatch.setitem(sys.modules, "ray", None)
    assert cli.main(["sweep", "--resume", "onray", "--runs-dir", str(runs_dir)]) == 2
    assert RAY_HINT in capsys.readouterr().err  # it went for Ray, as recorded
    assert not (runs_dir / "onray-b1-z2").exists()
    bad = ["sweep", "--resume", "onray", "--runs-dir", str(runs_dir), "--executor", "local", "--workers", "0"]
    assert cli.main(bad) == 2 and "--workers must be at least 1" in capsys.readouterr().err


def test_final_numbers_follow_appended_rows_and_a_replaced_file(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    path = run / runs.METRICS

    def row(split, step, **kw):
        return json.dumps({"split": split, "step": step, "epoch": step / 8, **kw}) + "\n"

    path.write_text(row("train", 8, loss=300.0, elbo=-300.0, recon=-290.0, kl=10.0)
                    + row("test", 8, elbo=-310.0, recon=-298.0, kl=12.0, active_units=2))
    assert sweep.final_numbers(run) == {"test_elbo": -310.0, "recon": -298.0, "kl": 12.0, "active_units": 2}
    with open(path, "a") as f:  # the next epoch, and an evidence row with bounds for k = 1, 10
        f.write(row("test", 16, elbo=-305.0, recon=-296.0, kl=9.0, active_units=1))
        f.write(row("evidence", 16, ks=[1, 10], iwae=[-305.5, -303.25]))
        f.write('{"split": "test", "step": 24, "elbo": -1')  # a line being written: not read yet
    assert sweep.final_numbers(run) == {"test_elbo": -305.0, "recon": -296.0, "kl": 9.0, "active_units": 1,
                                        "iwae": -303.25, "iwae_k": 10}
    runs.atomic_write_bytes(path, row("test", 8, elbo=-320.0, recon=-300.0, kl=20.0).encode())  # a resume's rewrite
    assert sweep.final_numbers(run) == {"test_elbo": -320.0, "recon": -300.0, "kl": 20.0}
