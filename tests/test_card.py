"""The model card's licence section: the base model's licence is read from its own card, never downloaded."""

from huggingface_hub import constants

from lmforge.card import base_model_license, licences
from lmforge.schema import DataConfig, FinetuneConfig

DATA = DataConfig(name="python-stdlib", license="PSF-2.0")


def test_a_local_base_models_licence_is_read_from_its_card(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# A base model\n")
    assert base_model_license(str(base)) == "mit"
    text = licences(DATA, FinetuneConfig(base=str(base)), "apache-2.0")
    assert f"Base model `{base}`: mit." in text and "not the base model's licence" in text
    assert "not the base" not in licences(DATA, FinetuneConfig(base=str(base)), "mit")


def test_a_hub_base_models_licence_comes_from_the_local_cache(tmp_path, monkeypatch):
    snapshot = tmp_path / "models--org--small-lm" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: llama3.2\n---\n")
    (tmp_path / "models--org--small-lm" / "refs").mkdir()
    (tmp_path / "models--org--small-lm" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert base_model_license("org/small-lm") == "llama3.2"
    assert base_model_license("org/not-cached") is None


def test_a_base_without_a_card_is_said_to_have_no_licence_found(tmp_path):
    text = licences(DATA, FinetuneConfig(base=str(tmp_path)), "apache-2.0")
    assert "no licence found in its card" in text and "- Training data: python-stdlib, PSF-2.0." in text
    assert licences(DATA, FinetuneConfig(base="pretrain"), "apache-2.0").count("\n") == 1  # data and this model only
