"""The class-file format: both spellings, round trips, presets and errors a user can act on."""

from __future__ import annotations

import json

import pytest

from cliptrase.classfile import (
    ClassList,
    dumps,
    load_class_file,
    parse_class_file,
    preset_names,
)
from cliptrase.errors import VocabularyError

YAML_FILE = """\
# vocabulary for street scenes
classes:
  - person; pedestrian; man; woman
  - car
  - name: traffic light
    synonyms: [signal]
    templates: ["a photo of a {}.", "a {} at a crossing."]
background: [sky, road]
templates:
  - "a photo of a {}."
  - "a blurry photo of a {}."
"""

TEXT_FILE = """\
# vocabulary for street scenes
template: a photo of a {}.
template: a blurry photo of a {}.
background: sky; road
person; pedestrian; man; woman   # the first name is the label
car

traffic light; signal
"""


def test_yaml_form_reads_names_synonyms_background_and_templates():
    cl = parse_class_file(YAML_FILE)
    assert cl.names == ("person", "car", "traffic light")
    assert cl.synonyms == (("pedestrian", "man", "woman"), (), ("signal",))
    assert cl.background == ("sky", "road")
    assert cl.templates == ("a photo of a {}.", "a blurry photo of a {}.")
    assert cl.class_templates == (None, None, ("a photo of a {}.", "a {} at a crossing."))
    assert cl.label_names == ["person", "car", "traffic light", "background"]
    assert cl.background_label == 3 and cl.num_labels == 4
    assert cl.prompts(0) == ("person", "pedestrian", "man", "woman")


def test_text_form_means_the_same_as_the_yaml_form_without_per_class_templates():
    text = parse_class_file(TEXT_FILE)
    yaml_form = parse_class_file(YAML_FILE)
    assert text.names == yaml_form.names
    assert text.synonyms == yaml_form.synonyms
    assert text.background == yaml_form.background
    assert text.templates == yaml_form.templates
    assert text.class_templates == (None, None, None)


@pytest.mark.parametrize("fmt", ["yaml", "json", "text"])
def test_round_trip_through_every_spelling(fmt):
    cl = parse_class_file(TEXT_FILE)
    assert parse_class_file(dumps(cl, fmt)) == cl


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_round_trip_keeps_per_class_templates(fmt):
    cl = parse_class_file(YAML_FILE)
    assert parse_class_file(dumps(cl, fmt)) == cl


def test_json_file_and_files_by_suffix(tmp_path):
    data = {"classes": ["cat; kitty", "dog"], "background": ["floor"]}
    (tmp_path / "v.json").write_text(json.dumps(data))
    (tmp_path / "v.txt").write_text("cat; kitty\ndog\nbackground: floor\n")
    (tmp_path / "v.yaml").write_text(dumps(ClassList.from_names(["cat; kitty", "dog"], ["floor"])))
    expected = ClassList(("cat", "dog"), (("kitty",), ()), ("floor",))
    for name in ("v.json", "v.txt", "v.yaml"):
        assert load_class_file(tmp_path / name) == expected
        assert load_class_file(str(tmp_path / name)) == expected


def test_a_one_class_text_file_is_not_mistaken_for_yaml(tmp_path):
    (tmp_path / "one").write_text("background: sky\nclasses\n")
    cl = load_class_file(tmp_path / "one")
    assert cl.names == ("classes",) and cl.background == ("sky",)


def test_class_file_from_s3(s3_endpoint):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("vocab")
    fs.pipe("vocab/street.yaml", YAML_FILE.encode())
    cl = load_class_file(
        "s3://vocab/street.yaml", storage_options={"client_kwargs": {"endpoint_url": s3_endpoint}}
    )
    assert cl == parse_class_file(YAML_FILE)


@pytest.mark.parametrize(
    "text, message",
    [
        ("# nothing here\n\n", "empty"),
        ("classes: []\n", "empty"),
        ("cat\ndog\ncat\n", r"'cat' appears more than once \(line 1, line 3\)"),
        ("cat; kitty\nkitty\n", r"'kitty' appears more than once \(line 1, line 2\)"),
        ("cat\nbackground: cat\n", "'cat' appears more than once .*background"),
        ("cat\ncat;;kitty\n", "line 2: empty name"),
        ("cat\nbackground: \n", "line 2: empty name"),
        ("cat\ntemplate: a photo\n", "line 2: a prompt template must .*'{}'"),
        ("classes:\n  - cat\n  - [dog]\n", "line 3: a class is a string or a mapping"),
        ("classes:\n  - cat\n  - {synonyms: [x]}\n", "line 3: a class mapping needs 'name'"),
        ("classes:\n  - cat\n  - 42\n", "line 3: expected a string"),
        ("classes: [cat]\ncolours: [red]\n", "unknown keys \\['colours'\\]"),
        ("classes: cat\n", "'classes' must be a list"),
        ("background\ncat\nbackground: sky\n", "'background' is a class name"),
    ],
)
def test_malformed_files_name_the_problem_and_the_line(text, message):
    with pytest.raises(VocabularyError, match=message):
        parse_class_file(text, source="v")


def test_missing_class_file_is_a_vocabulary_error(tmp_path):
    with pytest.raises(VocabularyError, match="class file not found"):
        load_class_file(tmp_path / "nope.yaml")


def test_every_benchmark_preset_has_its_published_size():
    expected = {
        "voc21": (20, True),
        "voc20": (20, False),
        "context60": (59, True),
        "context59": (59, False),
        "coco_object": (80, True),
        "coco_stuff171": (171, False),
        "ade20k": (150, False),
        "cityscapes": (19, False),
    }
    assert set(preset_names()) == set(expected)
    for name, (classes, background) in expected.items():
        cl = ClassList.from_preset(name)
        assert (cl.num_classes, bool(cl.background)) == (classes, background), name
    voc = ClassList.from_preset("voc21")
    assert voc.names[0] == "aeroplane" and voc.names[-1] == "television monitor"
    assert voc.synonyms[voc.names.index("person")][0] == "person in shirt"
    assert len(voc.background) == 26 and voc.background[0] == "sky"
    assert ClassList.from_preset("context60").background == ("background",)
    assert ClassList.from_preset("cityscapes").names[:3] == ("road", "sidewalk", "building")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(VocabularyError, match="voc21"):
        ClassList.from_preset("voc2012")


def test_vocabulary_args_leave_synonyms_to_the_synonyms_field():
    cl = ClassList.from_preset("voc21")
    classes, background, templates = cl.vocabulary_args()
    assert classes[14] == "person" and len(background) == 26 and templates is None
    assert len(cl.synonyms) == len(classes) and any(cl.synonyms)
    assert classes == list(cl.without_synonyms().vocabulary_args()[0])


def test_vocabulary_args_compile_in_the_segmentor(tiny):
    cl = parse_class_file("template: a photo of a {}.\nbackground: sky\ncat\ndog\n")
    vocab = tiny.vocabulary(*cl.vocabulary_args())
    assert vocab.names == cl.label_names
    assert vocab.embeddings.shape[0] == 3  # cat, dog, sky


def test_from_names_splits_synonyms_and_validates():
    cl = ClassList.from_names(["person; man", "car"], ["sky"])
    assert cl.synonyms == (("man",), ())
    with pytest.raises(VocabularyError, match="empty"):
        ClassList.from_names([])
    with pytest.raises(VocabularyError, match="more than once"):
        ClassList.from_names(["car", "car"])


def test_the_examples_in_docs_evaluation_parse_to_the_same_vocabulary():
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "evaluation.md").read_text()
    blocks = dict(re.findall(r"```(yaml|json|text)\n(.*?)```", doc, flags=re.S))
    parsed = {fmt: parse_class_file(text) for fmt, text in blocks.items()}
    assert set(parsed) == {"yaml", "json", "text"}
    for cl in parsed.values():
        assert cl.label_names == ["person", "car", "traffic light", "background"]
        assert cl.synonyms == (("pedestrian", "cyclist"), (), ("signal",))
        assert cl.background == ("sky", "road", "building")
