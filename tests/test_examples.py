"""The shipped example runs: made by the CLI, small, listed without torch, opened from the page with one click."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

from dashboard.state import get_lab
from vae_core import cli, examples, runs, sources
from vae_core.config import RunConfig
from vae_core.lab import Lab

from test_data import write_idx

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
SHIPPED = examples.list_examples()


def recipe_config(argv: list[str]) -> RunConfig:
    """The config `python -m vae_core train <argv>` builds (the CLI's own parser and rules)."""
    args = cli._parser().parse_args(argv)
    return RunConfig().replace(**cli._changes(args))


def test_every_recipe_is_a_cli_command_whose_name_says_what_it_trains():
    for recipe, argv in zip(examples.RECIPES, examples.commands()):
        cfg = recipe_config(argv)
        dataset, z, b = recipe.name.split("-")
        assert cfg.train.dataset.startswith(dataset) and f"z{cfg.model.latent_dim}" == z
        assert f"b{cfg.train.beta:g}" == b and cfg.model.hidden_dim <= 128  # small: under 1 MB a zip
        assert examples.SAFE_NAME.match(recipe.name)


def test_the_shipped_examples_are_few_small_and_load(tmp_path):
    assert {e.name for e in SHIPPED} == {r.name for r in examples.RECIPES}, "remake with examples/make_examples.sh"
    assert sum(e.size_bytes for e in SHIPPED) < 5 * 2**20
    lab = Lab(tmp_path / "runs")
    for ex in SHIPPED:
        name = lab.import_zip(ex.path, name=ex.name)
        ckpt = runs.load_checkpoint(lab.path(name) / runs.CHECKPOINT)
        assert "optimizer" not in ckpt  # shipped without Adam's moments: a third of the size
        cfg = runs.read_config(lab.path(name))
        assert (cfg.train.dataset, cfg.model.latent_dim, cfg.train.beta) == (ex.dataset, ex.latent_dim, ex.beta)
        assert cfg == recipe_config(examples.commands([r for r in examples.RECIPES if r.name == ex.name])[0])
        tests = [m for m in runs.read_metrics(lab.path(name)) if m["split"] == "test"]
        assert len(tests) == cfg.train.epochs  # trained to the end, one test row an epoch


def test_an_example_resumes_without_optimizer_state(tmp_path, tiny_sprites):
    """What resume does with the checkpoint (RunMath): the weights load, Adam starts afresh, training moves on."""
    from vae_core.run_math import RunMath

    ex = next(e for e in SHIPPED if e.dataset == "sprites")
    name = Lab(tmp_path / "runs").import_zip(ex.path)
    ckpt = runs.load_checkpoint(tmp_path / "runs" / name / runs.CHECKPOINT)
    cfg = runs.read_config(tmp_path / "runs" / name)
    m = RunMath(cfg, tiny_sprites, torch.device("cpu"), lr=cfg.train.lr, checkpoint=ckpt)
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in m.model.state_dict().items())
    before = m.evaluate()["elbo"]
    for _ in range(3):
        m.train_step(m.batch(torch.arange(64)), beta=cfg.train.beta, free_bits=0.0, lr=cfg.train.lr)
    assert m.evaluate()["elbo"] != before and before > -200  # trained weights, not a fresh model (~-540)


def test_listing_skips_what_is_not_an_example(tmp_path):
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with zipfile.ZipFile(tmp_path / "Bad Name.zip", "w") as z:
        z.writestr("x/config.json", "{}")
    assert examples.list_examples(tmp_path) == []


# ------------------------------------------------------------------ the page

@pytest.fixture
def page(runs_dir):
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["sid"] = "exampletab1"
    at.run()
    at.session_state["main_tab"] = "Runs"
    at.run()
    yield at
    get_lab().shutdown()
    st.cache_resource.clear()
    st.cache_data.clear()


def open_example(at: AppTest, name: str) -> AppTest:
    at.button(key=f"runs_example_{name}").click().run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def every_tab_draws(at: AppTest) -> None:
    for tab in ("Training", "Explore latent space", "Evidence: ELBO ≤ log p(x)", "Runs"):
        at.session_state["main_tab"] = tab
        at.run()
        assert not at.exception, (tab, [e.message for e in at.exception])


def test_a_first_page_offers_the_examples_and_one_click_opens_one(page, runs_dir):
    from dashboard.panels import training

    assert "example in the **Runs** tab" in training.panel_view(None, None, False)[0]["notice"]
    offered = [b.key for b in page.button if b.key and b.key.startswith("runs_example_")]
    assert offered == [f"runs_example_{e.name}" for e in SHIPPED]
    open_example(page, "sprites-z8-b1")
    assert (runs_dir / "sprites-z8-b1" / runs.CHECKPOINT).exists()  # a copy in the runs folder
    shown = get_lab().current("exampletab1")
    assert shown is not None and shown.name == "sprites-z8-b1" and shown.status().state == "finished"
    assert any("Opened the example" in s.value for s in page.success)
    assert list(page.dataframe(key="runs_table").value["Name"]) == ["sprites-z8-b1"]
    assert page.session_state["cfg_latent_dim"] == 8  # the sidebar shows the example's settings
    every_tab_draws(page)
    open_example(page, "sprites-z8-b1")  # again: a second copy, never the first one overwritten
    assert (runs_dir / "sprites-z8-b1-2").is_dir()


def test_an_example_whose_dataset_is_missing_says_so_and_draws(page, runs_dir, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_DIRS", {})  # no Fashion-MNIST here, and no network to fetch it
    monkeypatch.delenv("VAE_DATA_DIR", raising=False)
    monkeypatch.setattr(sources, "_network_reachable", lambda *a, **k: False)
    monkeypatch.setattr("vae_core.data._network_reachable", lambda *a, **k: False)
    page.run()
    open_example(page, "fashion-z2-b1")
    warning = " ".join(w.value for w in page.warning)
    assert "fashion-mnist, which is not on this machine" in warning and "apt-get install" in warning
    assert get_lab().current("exampletab1").name == "fashion-z2-b1"
    every_tab_draws(page)


# ------------------------------------------------------------------ remaking them

@pytest.mark.slow
def test_the_remake_script_makes_examples_the_page_can_list(tmp_path, monkeypatch):
    """examples.make runs the recipes through the CLI; here two of them, one epoch on a few images."""
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "cache"))
    write_idx(tmp_path / "idx", n_train=128, n_test=32)
    tiny = ["--epochs", "1", "--train-size", "128", "--batch-size", "64", "--evidence-every", "0", "--threads", "1",
            "--data-dir", str(tmp_path / "idx")]
    made = examples.make(tmp_path / "out", extra=tiny, names=["sprites-z2-b1", "fashion-z2-b1"])
    assert [p.name for p in made] == ["sprites-z2-b1.zip", "fashion-z2-b1.zip"]
    listed = examples.list_examples(tmp_path / "out")
    assert [e.name for e in listed] == ["sprites-z2-b1", "fashion-z2-b1"]
    assert all(e.size_bytes < 2**20 for e in listed)
    name = Lab(tmp_path / "runs").import_zip(made[1])
    assert "optimizer" not in runs.load_checkpoint(tmp_path / "runs" / name / runs.CHECKPOINT)
