"""One config convention for every job: dataclass fields with help text, presets as data, `--config FILE`.

A config is a dataclass whose fields are declared with `option(default, "meaning (unit)")`. `parse_config`
builds the command line from it and resolves, lowest priority first:
    dataclass defaults < preset (`--preset NAME`, a JSON file shipped with the package) < `--config FILE`
    (YAML or JSON, e.g. the `config.json` a run wrote) < flags typed on the command line.
A resolved config written with `save_config` and fed back with `--config` gives the same config again.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("none", "null")


def option(default: Any, help: str) -> Any:
    """A dataclass field with its help text (shown by `--help`); tuples are stored as given."""
    return dataclasses.field(default=default, metadata={"help": help})


def field_help(cls: type, name: str) -> str:
    """The help text of a config field."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)


def _unwrap_optional(hint) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) of `X | None`."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _converter(kind, optional: bool):
    """argparse `type=` for a scalar field type; 'none' gives None where the field allows it."""
    base = {bool: _parse_bool, int: int, float: float}.get(kind, str)

    def convert(text: str):
        if optional and text.lower() in _NONE:
            return None
        return base(text)

    convert.__name__ = getattr(kind, "__name__", "str")
    return convert


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, shown_defaults: dict | None = None,
                         shown_from: str = "") -> None:
    """One `--flag` per field (dashes for underscores) with the field's help; no default is set here,
    so that `parse_config` can tell typed flags from untyped ones. `shown_defaults` are the values --help
    prints (the default preset's), labelled with `shown_from`."""
    hints = typing.get_type_hints(cls)
    shown_defaults = shown_defaults or {}
    group = parser.add_argument_group(f"{cls.__name__} fields (flags override --config and --preset)")
    for f in dataclasses.fields(cls):
        if f.name == "preset":
            continue  # set by the job-level --preset flag
        kind, optional = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        shown = shown_defaults.get(f.name, f.default)
        help_text = f"{f.metadata.get('help', '')} [default{shown_from}: {_show(shown)}]".replace("%", "%%")
        if typing.get_origin(kind) is tuple:
            args = typing.get_args(kind)
            element = args[0]
            nargs = "+" if (len(args) == 2 and args[1] is Ellipsis) else len(args)
            group.add_argument(flag, dest=f.name, nargs=nargs, type=_converter(element, False),
                               default=argparse.SUPPRESS, help=help_text, metavar=element.__name__.upper())
        elif kind is bool:
            # `--use-gpu` alone means true; `--use-gpu false` is accepted too.
            group.add_argument(flag, dest=f.name, nargs="?", const=True, type=_converter(bool, optional),
                               default=argparse.SUPPRESS, help=help_text, metavar="BOOL")
        else:
            group.add_argument(flag, dest=f.name, type=_converter(kind, optional), default=argparse.SUPPRESS,
                               help=help_text, metavar=getattr(kind, "__name__", "STR").upper())


def _show(value) -> str:
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value) if value else "()"
    return str(value)


def read_config_file(path: str | Path) -> dict:
    """Fields from a YAML or JSON file (a flat mapping of field name -> value)."""
    text = Path(path).read_text(encoding="utf-8")
    if str(path).lower().endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise TypeError(f"{path}: a config file must hold a mapping of field names to values")
    return data


def config_from_dict(cls: type, data: dict, *, source: str = "config"):
    """Build `cls` from a mapping; unknown names are an error that lists them (typos must not pass silently)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} fields {unknown}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        kind, _ = _unwrap_optional(hints[name])
        if typing.get_origin(kind) is tuple and value is not None:
            value = tuple(value)
        values[name] = value
    return cls(**values)


def config_to_dict(config) -> dict:
    """JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def save_config(config, path: str | Path) -> None:
    """Write the resolved config as JSON (readable back with `--config`)."""
    Path(path).write_text(json.dumps(config_to_dict(config), indent=2) + "\n")


def add_job_arguments(parser: argparse.ArgumentParser, cls: type, *, presets: dict[str, dict], default_preset: str,
                      extra: typing.Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """A job's flags on `parser`: --preset, --config, --verbose, the job's own (`extra`), one per config field."""
    parser.add_argument("--preset", choices=sorted(presets), default=None,
                        help=f"named defaults (data, not code); default: {default_preset}, or the `preset` "
                             "named in --config")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML or JSON file of field values (e.g. the config.json of an earlier run); "
                             "flags typed here override it")
    # SUPPRESS: under `rayapp --verbose train-rm` the sub-command must not reset the top-level flag to False.
    parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="let Ray, Ray Data, Ray Train and DeepSpeed log at INFO (off: warnings a user "
                             "cannot act on are hidden)")
    if extra is not None:
        extra(parser)
    add_config_arguments(parser, cls, presets[default_preset], f" (preset {default_preset})")


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, cls: type, *,
                     presets: dict[str, dict], default_preset: str):
    """The config that `args` (parsed by a parser set up with `add_job_arguments`) resolve to."""
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        file_values = read_config_file(args.config) if args.config else {}
    except (OSError, TypeError, ValueError) as err:  # missing file, not a mapping, bad YAML / JSON
        parser.error(f"--config {args.config}: {err}")
    preset = args.preset or file_values.get("preset") or default_preset
    values = dict(presets[preset])
    values.update(file_values)
    values.update({k: v for k, v in vars(args).items() if k in names})
    if "preset" in names:
        values["preset"] = preset
    try:
        return config_from_dict(cls, values, source=args.config or "command line")
    except (TypeError, ValueError) as err:
        parser.error(str(err))


def parse_config(cls: type, argv: list[str] | None, *, presets: dict[str, dict], default_preset: str,
                 description: str, extra: typing.Callable[[argparse.ArgumentParser], None] | None = None):
    """Parse a job's command line into (config, namespace of the job's own extra flags).

    `presets` maps a preset name to its field values; the chosen preset name is kept in the config's
    `preset` field when the class has one.
    """
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser, cls, presets=presets, default_preset=default_preset, extra=extra)
    args = parser.parse_args(argv)
    args.verbose = getattr(args, "verbose", False)
    return config_from_args(parser, args, cls, presets=presets, default_preset=default_preset), args


def load_presets(directory: Path) -> dict[str, dict]:
    """Every `<name>.json` in a presets directory, by name."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}
