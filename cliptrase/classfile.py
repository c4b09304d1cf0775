"""One class-file format for vocabularies: the same file drives labelling and evaluation.

Two spellings of the same content (``docs/evaluation.md`` has examples):

* YAML or JSON, a mapping ``{classes: [...], background: [...], templates: [...]}``. A class is
  either a string ``"person; man; woman"`` (the first name is the label, the rest are synonyms)
  or a mapping ``{name: person, synonyms: [man, woman], templates: ["a photo of a {}."]}``.
* Plain text: one class per line (synonyms after ``;``), a line ``background: sky; wall`` for
  background words, ``template: a photo of a {}.`` lines for prompt templates, ``#`` comments.

The synonym separator is ``;`` everywhere. The method repos disagree (SCLIP and NACLIP split on
``", "``, ClearCLIP on ``","``, ProxyCLIP on ``"; "``), and commas occur inside real class
names ("table, dining"), so a semicolon is the one that cannot be confused.

Label ``i`` is class ``i``; with background words, every background word predicts one extra
label, the last one, named ``"background"`` (the order :class:`cliptrase.Vocabulary` uses).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from .errors import VocabularyError

SYNONYM_SEPARATOR = ";"
BACKGROUND_LABEL = "background"
_STRUCTURED_SUFFIXES = (".yaml", ".yml", ".json")
_CLASS_KEYS = {"name", "synonyms", "templates"}
_TOP_KEYS = {"classes", "background", "templates"}


@dataclass(frozen=True)
class ClassList:
    """Class names with synonyms, background words and prompt templates.

    ``synonyms[i]`` are the extra prompts of class ``i`` (its name excluded); ``class_templates[i]``
    overrides ``templates`` for class ``i`` (None: use ``templates``); ``templates`` None means the
    segmentor's default (OpenAI's 80 ImageNet templates).
    """

    names: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...] = ()
    background: tuple[str, ...] = ()
    templates: tuple[str, ...] | None = None
    class_templates: tuple[tuple[str, ...] | None, ...] = ()

    def __post_init__(self):
        # Normalise defaults so that equality does not depend on how the list was built.
        n = len(self.names)
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "synonyms", tuple(tuple(s) for s in self.synonyms) or ((),) * n)
        object.__setattr__(self, "background", tuple(self.background))
        if self.templates is not None:
            object.__setattr__(self, "templates", tuple(self.templates))
        object.__setattr__(
            self,
            "class_templates",
            tuple(None if t is None else tuple(t) for t in self.class_templates) or (None,) * n,
        )
        _validate(self)

    # ---------------------------------------------------------------- builders
    @classmethod
    def from_names(
        cls, classes: list[str] | tuple[str, ...], background: list[str] | tuple[str, ...] = ()
    ) -> ClassList:
        """Classes given as ``"name; synonym; ..."`` strings, e.g. from ``--classes``."""
        entries = [_split_synonyms(c, f"class {i + 1}") for i, c in enumerate(classes)]
        return cls(
            names=tuple(e[0] for e in entries),
            synonyms=tuple(e[1:] for e in entries),
            background=tuple(b.strip() for b in background),
        )

    @classmethod
    def from_preset(cls, name: str, family: str = "clip") -> ClassList:
        """A shipped benchmark class list: see :func:`preset_names`. ``family``: whose papers'
        list (the SAM 3 methods prompt with SegEarth-OV3's names, where they have their own)."""
        if name not in preset_names():
            raise VocabularyError(
                f"unknown class-list preset {name!r}; the presets are {', '.join(preset_names())}"
            )
        folder = resources.files(__package__).joinpath("presets")
        if family != "clip" and folder.joinpath(family, f"{name}.txt").is_file():
            folder = folder.joinpath(family)
        text = folder.joinpath(f"{name}.txt").read_text("utf-8")
        return parse_class_file(text, fmt="text", source=f"preset {name}")

    # ------------------------------------------------------------------- views
    @property
    def num_classes(self) -> int:
        """Foreground classes."""
        return len(self.names)

    @property
    def label_names(self) -> list[str]:
        """Name of every label the segmentor outputs: the classes, then ``background``."""
        return list(self.names) + ([BACKGROUND_LABEL] if self.background else [])

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def background_label(self) -> int | None:
        return self.num_classes if self.background else None

    @property
    def has_synonyms(self) -> bool:
        return any(self.synonyms)

    def prompts(self, index: int) -> tuple[str, ...]:
        """Every phrase of class ``index``: its name, then its synonyms."""
        return (self.names[index],) + self.synonyms[index]

    def without_synonyms(self) -> ClassList:
        """The same labels, each prompted by its name only."""
        return ClassList(self.names, (), self.background, self.templates, self.class_templates)

    def vocabulary_args(self) -> tuple[list[str], list[str], list[str] | None]:
        """``(classes, background, templates)`` for :meth:`cliptrase.Segmentor.vocabulary`.

        Synonyms are not part of these; pass :attr:`synonyms` as ``synonyms=`` (or use
        :meth:`cliptrase.Segmentor.vocabulary_from`). Per-class templates are refused here.
        """
        if any(t is not None for t in self.class_templates):
            raise VocabularyError(
                "per-class templates are not supported by the labelling pipeline yet; "
                "give templates for the whole file instead"
            )
        templates = list(self.templates) if self.templates is not None else None
        return list(self.names), list(self.background), templates

    # ---------------------------------------------------------------- writers
    def to_dict(self) -> dict[str, Any]:
        """The structured form (``yaml.safe_dump``/``json.dumps`` it to get a class file)."""
        classes: list[Any] = []
        for name, synonyms, templates in zip(self.names, self.synonyms, self.class_templates):
            if templates is None:
                classes.append(f"{SYNONYM_SEPARATOR} ".join((name,) + synonyms))
            else:
                entry: dict[str, Any] = {"name": name}
                if synonyms:
                    entry["synonyms"] = list(synonyms)
                entry["templates"] = list(templates)
                classes.append(entry)
        out: dict[str, Any] = {"classes": classes}
        if self.background:
            out["background"] = list(self.background)
        if self.templates is not None:
            out["templates"] = list(self.templates)
        return out

    def to_text(self) -> str:
        """The plain-text form (per-class templates cannot be written in it)."""
        if any(t is not None for t in self.class_templates):
            raise VocabularyError("per-class templates need the YAML/JSON form; use to_dict()")
        sep = f"{SYNONYM_SEPARATOR} "
        lines = [f"template: {t}" for t in self.templates or ()]
        if self.background:
            lines.append(f"background: {sep.join(self.background)}")
        lines += [sep.join(self.prompts(i)) for i in range(self.num_classes)]
        return "\n".join(lines) + "\n"


def preset_names() -> list[str]:
    """Names accepted by :meth:`ClassList.from_preset`."""
    folder = resources.files(__package__).joinpath("presets")
    return sorted(p.name[: -len(".txt")] for p in folder.iterdir() if p.name.endswith(".txt"))


# --------------------------------------------------------------------- loading
def load_class_file(source: str | os.PathLike, storage_options: dict | None = None) -> ClassList:
    """Read a class file from a local path or an fsspec URI (``s3://...``).

    A string holding a newline is taken as the file's content itself.
    """
    if isinstance(source, str) and "\n" in source:
        return parse_class_file(source)
    import fsspec  # storage is only needed when reading a file

    uri = os.fspath(source)
    try:
        with fsspec.open(uri, "rt", encoding="utf-8", **(storage_options or {})) as f:
            text = f.read()
    except FileNotFoundError as err:
        raise VocabularyError(f"class file not found: {uri}") from err
    except (OSError, ValueError) as err:
        raise VocabularyError(f"cannot read class file {uri}: {err}") from err
    suffix = os.path.splitext(uri.rstrip("/"))[1].lower()
    fmt = "structured" if suffix in _STRUCTURED_SUFFIXES else None
    return parse_class_file(text, fmt="text" if suffix == ".txt" else fmt, source=uri)


def parse_class_file(text: str, fmt: str | None = None, source: str = "<class file>") -> ClassList:
    """Parse a class file's content. ``fmt``: ``"structured"`` (YAML/JSON), ``"text"`` or None
    (structured when the content is a mapping with a ``classes`` key, else text)."""
    if fmt not in (None, "structured", "text"):
        raise ValueError(f"fmt must be 'structured', 'text' or None, got {fmt!r}")
    if fmt != "text":
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as err:
            if fmt == "structured":
                raise VocabularyError(f"{source}: not valid YAML/JSON: {err}") from err
            node = None
        is_mapping = isinstance(node, yaml.MappingNode)
        keys = {k.value for k, _ in node.value} if is_mapping else set()
        if fmt == "structured" or "classes" in keys:
            return _parse_structured(node, source)
    return _parse_text(text, source)


def _parse_text(text: str, source: str) -> ClassList:
    names: list[str] = []
    synonyms: list[tuple[str, ...]] = []
    lines_of: list[int] = []
    background: list[str] = []
    templates: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}, line {number}"
        key, colon, rest = line.partition(":")
        key = key.strip().lower()
        if colon and key == "background":
            background += _split_synonyms(rest, where)
        elif colon and key in ("template", "templates"):
            templates.append(_check_template(rest.strip(), where))
        else:
            prompts = _split_synonyms(line, where)
            names.append(prompts[0])
            synonyms.append(prompts[1:])
            lines_of.append(number)
    return _build(names, synonyms, background, templates or None, None, source, lines_of, "line")


def _parse_structured(node: yaml.Node | None, source: str) -> ClassList:
    if not isinstance(node, yaml.MappingNode):
        raise VocabularyError(
            f"{source}: a class file must be a mapping with a 'classes' list (or plain text)"
        )
    top = {k.value: v for k, v in node.value}
    unknown = set(top) - _TOP_KEYS
    if unknown:
        raise VocabularyError(
            f"{source}, line {_line(node)}: unknown keys {sorted(unknown)}; "
            f"expected {sorted(_TOP_KEYS)}"
        )
    if "classes" not in top:
        raise VocabularyError(f"{source}: no 'classes' list")
    classes_node = top["classes"]
    if not isinstance(classes_node, yaml.SequenceNode):
        raise VocabularyError(f"{source}, line {_line(classes_node)}: 'classes' must be a list")
    names: list[str] = []
    synonyms: list[tuple[str, ...]] = []
    class_templates: list[tuple[str, ...] | None] = []
    lines_of: list[int] = []
    for item in classes_node.value:
        where = f"{source}, line {_line(item)}"
        if isinstance(item, yaml.ScalarNode):
            prompts = _split_synonyms(_scalar(item, where), where)
            names.append(prompts[0])
            synonyms.append(prompts[1:])
            class_templates.append(None)
        elif isinstance(item, yaml.MappingNode):
            entry = {k.value: v for k, v in item.value}
            unknown = set(entry) - _CLASS_KEYS
            if unknown or "name" not in entry:
                raise VocabularyError(
                    f"{where}: a class mapping needs 'name' and may have 'synonyms' and "
                    f"'templates'; got keys {sorted(entry)}"
                )
            name = _scalar(entry["name"], where).strip()
            if SYNONYM_SEPARATOR in name:
                raise VocabularyError(
                    f"{where}: {name!r}: in the mapping form list synonyms under 'synonyms'"
                )
            names.append(name)
            synonyms.append(tuple(_string_list(entry.get("synonyms"), source, "synonyms")))
            templates = entry.get("templates")
            class_templates.append(
                None
                if templates is None
                else tuple(
                    _check_template(t, where)
                    for t in _string_list(templates, source, "templates", allow_empty=False)
                )
            )
        else:
            raise VocabularyError(f"{where}: a class is a string or a mapping, got a list")
        lines_of.append(_line(item))
    background = _string_list(top.get("background"), source, "background")
    templates = top.get("templates")
    if templates is not None:
        where = f"{source}, line {_line(templates)}"
        templates = [
            _check_template(t, where)
            for t in _string_list(templates, source, "templates", allow_empty=False)
        ]
    return _build(names, synonyms, background, templates, class_templates, source, lines_of, "line")


def _build(names, synonyms, background, templates, class_templates, source, lines_of, unit):
    if not names:
        raise VocabularyError(f"{source}: the class list is empty; give at least one class")
    try:
        return ClassList(
            tuple(names),
            tuple(synonyms),
            tuple(background),
            None if templates is None else tuple(templates),
            tuple(class_templates) if class_templates is not None else (),
        )
    except _Duplicate as dup:
        where = ", ".join(f"{unit} {lines_of[i]}" for i in dup.classes if i is not None)
        bg = " and the background words" if dup.in_background else ""
        raise VocabularyError(
            f"{source}: {dup.phrase!r} appears more than once ({where}{bg}); "
            "every name, synonym and background word must be unique"
        ) from None


# ------------------------------------------------------------------ validation
class _Duplicate(VocabularyError):
    def __init__(self, phrase: str, classes: list[int | None], in_background: bool):
        self.phrase, self.classes, self.in_background = phrase, classes, in_background
        where = [f"class {i}" for i in classes if i is not None]
        if in_background:
            where.append("background words")
        super().__init__(f"{phrase!r} appears more than once ({', '.join(where)})")


def _validate(cl: ClassList) -> None:
    n = len(cl.names)
    if n == 0:
        raise VocabularyError("the class list is empty; give at least one class")
    if len(cl.synonyms) != n or len(cl.class_templates) != n:
        raise VocabularyError("synonyms and class_templates need one entry per class")
    owners: dict[str, list[int | None]] = {}
    for index in range(n):
        for phrase in cl.prompts(index):
            _check_phrase(phrase, f"class {index}")
            owners.setdefault(phrase, []).append(index)
    for phrase in cl.background:
        _check_phrase(phrase, "background words")
        owners.setdefault(phrase, []).append(None)
    for phrase, where in owners.items():
        if len(where) > 1:
            raise _Duplicate(phrase, where, None in where)
    if cl.background and BACKGROUND_LABEL in cl.names:
        raise VocabularyError(
            "'background' is a class name and also the label that background words map to; "
            "drop the class or list 'background' as a background word instead"
        )
    for template in (cl.templates or ()) + tuple(t for ts in cl.class_templates for t in ts or ()):
        _check_template(template, "templates")


def _check_phrase(phrase: Any, where: str) -> None:
    if not isinstance(phrase, str) or not phrase.strip():
        raise VocabularyError(f"{where}: names must be non-empty strings, got {phrase!r}")
    if phrase != phrase.strip():
        raise VocabularyError(f"{where}: {phrase!r} has leading or trailing spaces")


def _check_template(template: Any, where: str) -> str:
    if not isinstance(template, str) or "{}" not in template:
        raise VocabularyError(
            f"{where}: a prompt template must be a string with '{{}}' for the class name, "
            f"got {template!r}"
        )
    return template


def _split_synonyms(text: str, where: str) -> tuple[str, ...]:
    if not isinstance(text, str):
        raise VocabularyError(f"{where}: expected a string, got {text!r}")
    parts = tuple(p.strip() for p in text.split(SYNONYM_SEPARATOR))
    if any(not p for p in parts):
        raise VocabularyError(
            f"{where}: empty name in {text.strip()!r} (names are separated by "
            f"'{SYNONYM_SEPARATOR}', with no empty names)"
        )
    return parts


def _scalar(node: yaml.Node, where: str) -> str:
    if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str":
        shown = node.value if isinstance(node, yaml.ScalarNode) else "a list or mapping"
        raise VocabularyError(f"{where}: expected a string, got {shown!r} (quote it)")
    return node.value  # a scalar node's value is already unescaped text


def _string_list(node: yaml.Node | None, source: str, key: str, allow_empty: bool = True):
    if node is None:
        return []
    where = f"{source}, line {_line(node)}"
    if isinstance(node, yaml.ScalarNode):  # "background: sky; wall" also works in YAML
        return list(_split_synonyms(_scalar(node, where), f"{where} ({key})"))
    if not isinstance(node, yaml.SequenceNode):
        raise VocabularyError(f"{where}: '{key}' must be a list of strings")
    values = [_scalar(item, f"{source}, line {_line(item)}") for item in node.value]
    if not values and not allow_empty:
        raise VocabularyError(f"{where}: '{key}' is an empty list")
    return [v.strip() for v in values]


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def dumps(classes: ClassList, fmt: str = "yaml") -> str:
    """Serialise to ``"yaml"``, ``"json"`` or ``"text"``; :func:`parse_class_file` reads it back."""
    if fmt == "text":
        return classes.to_text()
    if fmt == "json":
        return json.dumps(classes.to_dict(), indent=2, ensure_ascii=False) + "\n"
    if fmt == "yaml":
        return yaml.safe_dump(classes.to_dict(), sort_keys=False, allow_unicode=True)
    raise ValueError(f"fmt must be 'yaml', 'json' or 'text', got {fmt!r}")
