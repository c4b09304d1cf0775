from __future__ import annotations

import dataclasses
import functools

import pytest

import pipeline
from cliptrase import VocabularyError

from .conftest import FAKE_SECRET, TINY, VOCAB, tiny_config


def test_config_hash_ignores_throughput_knobs_and_credentials():
    base = tiny_config(["in/"], "out")
    same = tiny_config(
        ["in/"],
        "out",
        segmentor=dataclasses.replace(TINY, batch_size=32),
        num_actors=7,
        decode_threads=5,
        reuse_host_memory=False,
        storage_options={"secret": FAKE_SECRET},
    )
    assert base.config_hash() == same.config_hash()
    assert len(base.config_hash()) == 12 and int(base.config_hash(), 16) >= 0


@pytest.mark.parametrize(
    "change",
    [
        {"vocabulary": pipeline.VocabularySpec(("person", "cat"))},
        {"vocabulary": pipeline.VocabularySpec(VOCAB.classes, templates=("a photo of a {}.",))},
        {"segmentor": dataclasses.replace(TINY, short_side=96)},
        {"segmentor": dataclasses.replace(TINY, model="ViT-B-16")},
        {"segmentor": dataclasses.replace(TINY, method="maskclip")},
        {"segmentor": dataclasses.replace(TINY, resize="pillow")},
        {"source": pipeline.SourceSpec(images_per_shard=4)},
        {"source": pipeline.SourceSpec(images_per_shard=3, image_column="jpg")},
        {"source": pipeline.SourceSpec(jpeg_draft=False)},
        {"source": pipeline.SourceSpec(gpu_decode=True)},
    ],
)
def test_config_hash_changes_with_what_changes_the_labels(change):
    assert (
        tiny_config(["in/"], "out").config_hash()
        != tiny_config(["in/"], "out", **change).config_hash()
    )


def test_storage_options_never_in_repr_or_description():
    config = tiny_config(["s3://bkt/in/"], "s3://bkt/out", storage_options={"secret": FAKE_SECRET})
    assert FAKE_SECRET not in repr(config)
    assert FAKE_SECRET not in str(config.describe())


def test_credentials_in_a_weights_uri_are_stripped_from_provenance():
    spec = dataclasses.replace(TINY, pretrained=f"s3://AKIA:{FAKE_SECRET}@bkt/w.safetensors")
    assert spec.describe()["pretrained"] == "s3://bkt/w.safetensors"
    assert FAKE_SECRET not in str(tiny_config(["in/"], "out", segmentor=spec).hashed_fields())


@pytest.mark.parametrize(
    "classes, background",
    [((), ()), (("cat", "cat"), ()), (("cat", " "), ()), (("background", "cat"), ("sky",))],
)
def test_bad_vocabulary_fails_on_the_driver_with_vocabulary_error(classes, background):
    with pytest.raises(VocabularyError):
        pipeline.VocabularySpec(classes, background)


def test_vocabulary_names_pool_background_words_into_one_label():
    assert VOCAB.names == ["person", "cat", "coffee cup", "rocket", "background"]


def test_credentials_in_a_uri_are_refused_without_echoing_them():
    with pytest.raises(ValueError, match="credentials in a URI") as err:
        pipeline.RunConfig(inputs=("s3://AKIA:hunter2@bucket/x/",), output="s3://bucket/out")
    assert "hunter2" not in str(err.value) and "s3://bucket/x/" in str(err.value)
    with pytest.raises(ValueError, match="credentials in a URI"):
        pipeline.RunConfig(inputs=("s3://bucket/x/",), output="gs://user:pw@bucket/out")


def test_synonyms_change_the_hash_only_when_given():
    plain = pipeline.VocabularySpec(("person", "cat"), ("sky",))
    empty = pipeline.VocabularySpec(("person", "cat"), ("sky",), synonyms=((), ()))
    with_synonyms = pipeline.VocabularySpec(("person", "cat"), ("sky",), synonyms=(("man",), ()))
    hashes = [
        pipeline.RunConfig(inputs=("x",), output="y", vocabulary=v).config_hash()
        for v in (plain, empty, with_synonyms)
    ]
    assert hashes[0] == hashes[1] != hashes[2]
    assert with_synonyms.names == ["person", "cat", "background"]


def test_synonyms_are_validated_on_the_driver():
    with pytest.raises(VocabularyError, match="one list of phrases per class"):
        pipeline.VocabularySpec(("person", "cat"), synonyms=(("man",),))
    with pytest.raises(VocabularyError, match="duplicate"):
        pipeline.VocabularySpec(("person", "cat"), synonyms=(("cat",), ()))


def _reference_config(**segmentor) -> pipeline.RunConfig:
    return pipeline.RunConfig(
        inputs=("s3://bucket/shards/",),
        output="s3://bucket/labels",
        segmentor=pipeline.SegmentorSpec(**segmentor),
        vocabulary=pipeline.VocabularySpec(("person", "car"), ("sky",)),
    )


def test_config_hash_of_a_reference_config_is_pinned():
    """Output prefixes must not move between releases: a changed hash relabels a corpus. If a
    change to the labels is intended, bump OUTPUT_FORMAT (or add a hashed field) and update
    this value."""
    assert _reference_config().config_hash() == "078cd089e444"


def test_pillow_resize_keeps_the_prefixes_of_the_runs_before_the_resize_option():
    """The default resize moved to torch's kernel (the default prefix moved with it, above);
    ``resize="pillow"`` is what every run did before, and it finds their prefixes."""
    assert _reference_config(resize="pillow").config_hash() == "2cb51156b1f4"
    assert _reference_config(method="sclip", resize="pillow").config_hash() == "c83c1e283758"
    assert "resize" not in _reference_config(resize="pillow").hashed_fields()["segmentor"]


def test_a_changed_preset_moves_its_runs_hash_and_no_other():
    """MaskCLIP's and NACLIP's presets now run their official protocols (issue 14): their
    runs' prefixes move (the values before it are written out); every other method's stays."""
    old = functools.partial(_reference_config, resize="pillow")  # the resize of those runs
    assert old(method="maskclip").config_hash() != "b89ea7f173fc"
    assert old(method="naclip").config_hash() != "bd75911cbec0"
    assert old(method="sclip").config_hash() == "c83c1e283758"
    assert old(method="cliptrase").config_hash() == "2cb51156b1f4"


def test_a_new_throughput_field_leaves_the_hash_alone():
    """Fields are hashed by inclusion: one added without the mark changes no prefix."""
    faster = dataclasses.make_dataclass(
        "FasterSpec",
        [("compile", bool, dataclasses.field(default=True))],
        bases=(pipeline.SegmentorSpec,),
        frozen=True,
    )
    reference = _reference_config()
    with_field = dataclasses.replace(reference, segmentor=faster())
    assert with_field.config_hash() == reference.config_hash()
    # ... while a hashed field still counts.
    assert _reference_config(precision="fp32").config_hash() != reference.config_hash()


def test_a_changed_floss_ranking_moves_only_that_methods_floss_runs():
    """Issue 31: FLOSS ranks templates on the segmentor's own plan, which changed MaskCLIP's
    experts (not its plain labels); its FLOSS runs move (the value before is written out), its
    plain runs and every other method's FLOSS runs stay."""
    with_floss = pipeline.FlossSpec(enabled=True)
    maskclip = _reference_config(method="maskclip")
    sclip = _reference_config(method="sclip")
    assert maskclip.config_hash() == "87ed23c5c38f"
    assert dataclasses.replace(maskclip, floss=with_floss).config_hash() not in (
        "03ecc0455430", maskclip.config_hash(),
    )  # fmt: skip
    assert dataclasses.replace(sclip, floss=with_floss).config_hash() == "b009bd953aec"
