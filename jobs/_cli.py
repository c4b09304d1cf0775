"""Argument groups and error handling shared by every ``python -m jobs.*`` entrypoint.

Bad input ends a job with exit status 2 and a one-line message (no traceback): an empty
vocabulary, a missing class file, unreadable storage, weights that cannot be fetched.
Storage options may hold credentials: they are read from ``--storage-options`` or the
``CLIPTRASE_STORAGE_OPTIONS`` environment variable and never logged or written to outputs.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Callable

from cliptrase.classfile import ClassList, load_class_file, preset_names
from cliptrase.config import ALL_METHOD_NAMES, FAMILY_DEFAULTS, method_family
from cliptrase.errors import CliptraseError, VocabularyError, WeightsUnavailableError
from cliptrase.hub import offline_if_unreachable

STORAGE_OPTIONS_ENV = "CLIPTRASE_STORAGE_OPTIONS"
RANDOM_WEIGHTS_BANNER = "RANDOM weights (plumbing check): these labels are not meaningful"
log = logging.getLogger("jobs")


class CliError(Exception):
    """Bad input a user can fix; the entrypoint prints the message and exits with status 2."""


OFFLINE_ADVICE = (
    "pass a local checkpoint with --weights PATH (or an s3:// URI), or --random-weights for a "
    "plumbing check"
)


def resolve_weights(model: str, pretrained: str | None, method: str = "cliptrase") -> None:
    """Fetch a hub's weights once, on the driver, before any actor starts: an open_clip tag
    for the CLIP methods, a Hugging Face id (``facebook/sam3``) for the SAM 3 methods.

    Runs in a short subprocess so the driver itself never imports torch. When the hub cannot
    be reached, sets ``HF_HUB_OFFLINE=1`` (here and for local actors) so the hub library
    answers from its cache at once instead of retrying for ~50 s. Weights that cannot be had
    end the job with one line (exit 2), before Ray starts.
    """
    import subprocess

    from cliptrase.names import is_pretrained_tag

    if pretrained is None:
        return
    family = method_family(method)
    if family == "clip" and is_pretrained_tag(pretrained):
        command = [sys.executable, "-m", "cliptrase.weights", model, pretrained]
    elif family == "sam3" and _is_hub_id(pretrained):
        command = [sys.executable, "-m", "cliptrase.sam3.weights", pretrained]
    else:
        return  # a local file or a URI: read by the actors
    offline_if_unreachable()
    proc = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
        reason = lines[-1][len("error: ") :] if lines else _tail(proc.stderr)
        if OFFLINE_ADVICE not in reason and "--random-weights" not in reason:
            reason = f"{reason}: {OFFLINE_ADVICE}"
        raise CliError(reason)
    log.info("weights %s/%s: %s", model, pretrained, proc.stdout.strip())


def _is_hub_id(pretrained: str) -> bool:
    """``owner/name`` (a Hugging Face repository), not a local path or a URI."""
    import re

    return (
        "://" not in pretrained
        and not os.path.exists(pretrained)
        and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", pretrained) is not None
        and not pretrained.endswith((".pt", ".pth", ".safetensors", ".bin"))
    )


def _tail(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "the weights could not be resolved"


# ------------------------------------------------------------------ labelled runs
CONFIG_HASH_HELP = (
    "which run to read when the output holds several (a prefix of its config hash is enough; "
    "default: the most recent; python -m jobs.runs --labels OUTPUT lists them)"
)


def add_run_args(parser: argparse.ArgumentParser, out: str | None = "folder or URI to write"):
    """``--labels`` and ``--config-hash`` (which run to read), and ``--out`` unless None."""
    parser.add_argument(
        "--labels",
        required=True,
        metavar="OUTPUT_URI",
        help="the labelling run's --output (folder or URI), or one of its config-hash prefixes",
    )
    parser.add_argument("--config-hash", default=None, help=CONFIG_HASH_HELP)
    if out is not None:
        parser.add_argument("--out", required=True, metavar="URI", help=out)


def open_run(labels: str, storage_options: dict | None = None, config_hash: str | None = None):
    """:func:`pipeline.outputs.open_run`, its errors worded for the command line."""
    from pipeline.outputs import AmbiguousRun, OutputError, RunNotFound, open_run

    try:
        return open_run(labels, storage_options, config_hash)
    except AmbiguousRun as err:
        raise CliError(f"{err}; give more of the hash to --config-hash") from None
    except RunNotFound as err:
        hint = "" if config_hash else " (is it the --output of a labelling run?)"
        raise CliError(f"{err}{hint}") from None
    except OutputError as err:
        raise CliError(str(err)) from None


# ------------------------------------------------------------------ arguments
def default_of(spec: type, name: str):
    """The default of a config dataclass's field: flags take their defaults from the one
    place each lives (pipeline.config, cliptrase.config), never repeat them."""
    import dataclasses

    for field in dataclasses.fields(spec):
        if field.name == name:
            if field.default is not dataclasses.MISSING:
                return field.default
            return field.default_factory()
    raise AttributeError(f"{spec.__name__} has no field {name!r}")

def add_storage_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-options",
        metavar="JSON",
        default=None,
        help="fsspec storage options for every URI, as JSON, e.g. "
        '\'{"client_kwargs": {"endpoint_url": "http://minio:9000"}}\'. Default: the '
        f"{STORAGE_OPTIONS_ENV} environment variable, else none. Never logged.",
    )


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, refused at parse time (before Ray starts) by flag."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_loading_args(group: argparse._ActionsContainer, run_defaults: bool = False) -> None:
    """--random-weights, --trust-pickle, --device, --precision. ``run_defaults``: for a job
    that re-segments a labelled run (review), whose weights and precision default to the
    run's."""
    group.add_argument(
        "--random-weights",
        action="store_true",
        help="random weights (plumbing check; default for runs made with them)"
        if run_defaults
        else "random weights instead of --weights: a plumbing check, every output says so",
    )
    group.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow pickled checkpoints that need full unpickling (runs code from the file)",
    )
    group.add_argument(
        "--device", default="auto", help="auto (GPU if torch sees one), cpu, cuda, cuda:1 ..."
    )
    group.add_argument(
        "--precision",
        default=None if run_defaults else "fp32",
        choices=("fp32", "fp16", "bf16"),
        help="default: the run's (fp32 on a CPU)"
        if run_defaults
        else "on a GPU (default fp32; jobs.label's bf16); a CPU runs fp32",
    )


def add_model_args(parser: argparse.ArgumentParser, title: str = "model") -> None:
    group = parser.add_argument_group(title)
    group.add_argument(
        "--model",
        default=None,
        help="CLIP methods: an open_clip ViT name (default ViT-B-16); SAM 3 methods: sam3",
    )
    group.add_argument(
        "--weights",
        default=None,
        help="CLIP methods: an open_clip pretrained tag (default openai, fetched by open_clip); "
        "SAM 3 methods: a Hugging Face id (default facebook/sam3, gated: accept the SAM License "
        "there and log in); either: a local checkpoint file or an fsspec URI such as "
        "s3://bucket/ViT-B-16.safetensors",
    )
    add_loading_args(group)
    group.add_argument(
        "--method",
        default="cliptrase",
        help=f"training-free method: {', '.join(ALL_METHOD_NAMES)} (docs/methods.md; default "
        "cliptrase); jobs.evaluate also takes a comma-separated list or 'all' (the CLIP "
        "methods) and writes a comparison table",
    )
    group.add_argument(
        "--short-side",
        type=positive_int,
        default=None,
        help="resize the short side to this (default: the method's, 336 for cliptrase)",
    )
    group.add_argument(
        "--resolution",
        choices=["original", "processing"],
        default="original",
        help="where labels are decided: 'original' (default; scores stretched to the image's "
        "size, as the official SCLIP/NACLIP code does) or 'processing' (at the short-side "
        "resolution, labels nearest-resized: the behaviour before output format 2)",
    )
    group.add_argument(
        "--batch-size", type=positive_int, default=16, help="images per forward pass"
    )


def add_vocabulary_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group(
        "vocabulary", "one of --classes, --class-file, --preset (format: docs/evaluation.md)"
    )
    source = group.add_mutually_exclusive_group(required=required)
    source.add_argument(
        "--classes",
        metavar='"a,b;b2,c"',
        help="class names separated by ',' with synonyms after ';' (e.g. \"person;man,car\"); "
        "quote a name that holds a comma: 'a,\"red, car\"'",
    )
    source.add_argument(
        "--class-file", metavar="PATH_OR_URI", help="a YAML, JSON or text class file"
    )
    source.add_argument(
        "--preset", choices=preset_names(), help="a benchmark class list shipped with cliptrase"
    )
    group.add_argument(
        "--background",
        metavar='"sky,wall"',
        help="background words separated by ','; they all predict one label 'background' "
        "(adds to those of a class file or preset)",
    )
    group.add_argument(
        "--drop-synonyms",
        action="store_true",
        help="prompt each class by its name only (default: a class scores as its best synonym)",
    )


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def add_job_args(parser: argparse.ArgumentParser, progress: bool = True) -> None:
    """What every job takes last: ``--no-progress`` (jobs with a progress bar), the storage
    options and the logging flags."""
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_storage_args(parser)
    add_logging_args(parser)


# -------------------------------------------------------------- interpretation
def storage_options(args: argparse.Namespace) -> dict:
    """The fsspec storage options of a job (flag, else environment, else empty)."""
    raw = args.storage_options
    origin = "--storage-options"
    if raw is None:
        raw = os.environ.get(STORAGE_OPTIONS_ENV)
        origin = STORAGE_OPTIONS_ENV
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        # The message names the position only: the text may hold credentials.
        raise CliError(f"{origin} is not valid JSON ({err.msg} at char {err.pos})") from None
    if not isinstance(value, dict):
        raise CliError(f"{origin} must be a JSON object, got {type(value).__name__}")
    # fsspec clients take their *_kwargs as mappings and fail deep inside otherwise. Only
    # key names and types are ever named: values may be secrets.
    for key, option in value.items():
        if key.endswith("_kwargs") and not isinstance(option, dict):
            raise CliError(
                f"{origin}: {key!r} must be a JSON object, got {_json_type(option)}"
            )
    return value


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else "a value")


def _split(text: str | None, flag: str = "--classes") -> list[str]:
    """Comma-separated names, CSV rules: ``a,"red, car"`` is ``["a", "red, car"]``."""
    import csv

    if not text:
        return []
    try:
        (fields,) = csv.reader([text], skipinitialspace=True, strict=True)
    except csv.Error as err:
        raise CliError(f"{flag}: cannot split {text!r} into names ({err})") from None
    return [part.strip() for part in fields if part.strip()]


def class_list(
    args: argparse.Namespace, options: dict | None = None, default: ClassList | None = None
) -> ClassList | None:
    """The ClassList the vocabulary flags describe; ``default`` (with any ``--background``
    added) if they name no classes; None if neither."""
    background = _split(getattr(args, "background", None), "--background")
    try:
        if args.classes is not None:
            classes = _split(args.classes)
            if not classes:
                raise CliError("--classes is empty: give names separated by ','")
            result = ClassList.from_names(classes, background)
            background = []
        elif args.class_file is not None:
            result = load_class_file(args.class_file, storage_options=options)
        elif args.preset is not None:
            result = ClassList.from_preset(args.preset)
        elif default is not None:
            result = default
        else:
            if background:
                raise CliError("--background needs classes (--classes, --class-file or --preset)")
            return None
        if background:
            result = ClassList(
                result.names,
                result.synonyms,
                result.background + tuple(background),
                result.templates,
                result.class_templates,
            )
        if getattr(args, "drop_synonyms", False):
            result = result.without_synonyms()
    except VocabularyError as err:
        raise CliError(str(err)) from None
    return result


def model_and_weights(args: argparse.Namespace, method: str | None = None) -> tuple[str, str | None]:
    """``(model, weights)`` the flags give for ``method`` (default ``--method``): the method's
    family's defaults where a flag is not given; weights None for ``--random-weights``."""
    method = method if method is not None else args.method
    try:
        family_model, family_weights = FAMILY_DEFAULTS[method_family(method)]
    except ValueError as err:
        raise CliError(str(err)) from None
    model = args.model or family_model
    weights = None if args.random_weights else (args.weights or family_weights)
    return model, weights


def load_segmentor(args: argparse.Namespace, options: dict | None = None, method=None):
    """The segmentor the model flags describe (random weights announced loudly), built by the
    one factory (:meth:`pipeline.SegmentorSpec.build`).

    ``method``: a method name overriding ``--method``.
    """
    from cliptrase.names import is_pretrained_tag
    from pipeline import SegmentorSpec

    method = method if method is not None else args.method
    model, pretrained = model_and_weights(args, method)
    if pretrained is not None and (is_pretrained_tag(pretrained) or _is_hub_id(pretrained)):
        offline_if_unreachable()
    try:
        segmentor = SegmentorSpec(
            model=model,
            pretrained=pretrained,
            method=method,
            precision=args.precision or "fp32",
            short_side=args.short_side,
            resolution=args.resolution,
            resize="pillow",  # the official code's resize: in-process jobs compare with it
            batch_size=args.batch_size,
            trust_pickle=args.trust_pickle,
        ).build(options, device=args.device)
    except WeightsUnavailableError as err:
        hint = ""
        if "--weights" not in str(err):
            hint = (
                "\nOffline? Pass a local checkpoint with --weights PATH (or an s3:// URI), "
                "or --random-weights for a plumbing check."
            )
        raise CliError(f"{err}{hint}") from None
    except (CliptraseError, ValueError) as err:
        raise CliError(str(err)) from None
    except RuntimeError as err:  # e.g. device='cuda' without a GPU
        raise CliError(str(err)) from None
    if segmentor.identity.random_weights:
        log.warning("%s: %s", model, RANDOM_WEIGHTS_BANNER)
    return segmentor


def parse_job_args(parser: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, dict]:
    """Every job's prologue: parse the flags, set up logging, read the storage options."""
    args = parser.parse_args(argv)
    setup_logging(args)
    return args, storage_options(args)


def setup_logging(args: argparse.Namespace | None = None) -> None:
    level = logging.INFO
    if args is not None and getattr(args, "verbose", False):
        level = logging.DEBUG
    elif args is not None and getattr(args, "quiet", False):
        level = logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # Third-party clients log request details (URLs, sometimes headers) at debug level.
    for noisy in ("botocore", "s3fs", "fsspec", "urllib3", "aiobotocore"):
        logging.getLogger(noisy).setLevel(max(level, logging.INFO))
    # open_clip and the hub announce every model build and download at INFO: a dozen lines
    for chatty in ("open_clip", "huggingface_hub", "timm"):
        logging.getLogger(chatty).setLevel(max(level, logging.WARNING))
    for handler in logging.getLogger().handlers:  # open_clip logs through the root logger
        handler.addFilter(_quiet_open_clip)


def _quiet_open_clip(record: logging.LogRecord) -> bool:
    from_open_clip = f"{os.sep}open_clip{os.sep}" in (record.pathname or "")
    return not (from_open_clip and record.levelno < logging.WARNING)


def exit_on_user_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Run ``main``; bad input becomes ``error: <message>`` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except (CliError, CliptraseError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except FileNotFoundError as err:
            print(f"error: not found: {err}", file=sys.stderr)
            return 2
        except PermissionError as err:
            print(f"error: storage refused access: {err}", file=sys.stderr)
            return 2
        except OSError as err:  # unreachable endpoint, missing bucket ...
            print(f"error: storage: {err}", file=sys.stderr)
            return 2
        except Exception as err:
            if not _is_storage_error(err):
                raise
            print(f"error: storage: {type(err).__name__}: {err}", file=sys.stderr)
            return 2

    return wrapper


_STORAGE_CLIENT_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs", "azure")


def _is_storage_error(err: Exception) -> bool:
    """Errors of the object-store clients (no credentials, access denied ...), which raise
    their own exception types rather than OSError."""
    return any(cls.__module__.split(".")[0] in _STORAGE_CLIENT_MODULES for cls in type(err).__mro__)
