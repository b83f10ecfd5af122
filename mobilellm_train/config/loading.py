"""Loading the configuration: defaults < TOML (--config) < --section.key overrides, each value
converted to its field's type (a wrong name or type is a ConfigError naming the key); then the
--help text from the field docstrings, and the effective config written back as TOML.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import math
import os
import re
import sys
import typing
from typing import Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from mobilellm_train.config.checks import validate
from mobilellm_train.config.sections import Config
from mobilellm_train.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Loading: defaults < TOML < command line.

_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_int(text: str) -> int:
    """'480000', '480_000', '480k', '1T', '1.5B', '2e9' -> int."""
    s = text.strip().replace("_", "")
    m = re.fullmatch(r"([0-9.eE+-]+)([kKmMbBgGtT]?)", s)
    if m is None:
        raise ValueError(f"not an integer: {text!r}")
    number, suffix = m.groups()
    try:
        value = int(number) if not suffix and re.fullmatch(r"[+-]?\d+", number) else float(number)
    except ValueError:
        raise ValueError(f"not an integer: {text!r}") from None
    value = value * _SUFFIXES.get(suffix.lower(), 1)
    if value != int(value):
        raise ValueError(f"not an integer: {text!r}")
    return int(value)


def _coerce(key: str, value, typ):
    """Convert a TOML or command-line value to the field's type, or raise ConfigError naming key."""
    from_cli = isinstance(value, str)
    origin = typing.get_origin(typ)
    try:
        if origin is Literal:
            choices = typing.get_args(typ)
            if value not in choices:
                raise ValueError(f"must be one of {', '.join(map(str, choices))}")
            return value
        if typ is bool:
            if isinstance(value, bool):
                return value
            if from_cli and value.lower() in ("true", "1", "yes", "on"):
                return True
            if from_cli and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if typ is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            if isinstance(value, int):
                return value
            if isinstance(value, str):
                return parse_int(value)
            raise ValueError("expected an integer")
        if typ is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            if isinstance(value, (int, float, str)):
                number = float(value)
                # Every float of the config is a finite quantity; inf or nan would only show up
                # later as a NaN loss or a schedule that never moves.
                if not math.isfinite(number):
                    raise ValueError("must be a finite number")
                return number
            raise ValueError("expected a number")
        if typ is str:
            if isinstance(value, str):
                return value
            raise ValueError("expected a string")
    except ValueError as e:
        raise ConfigError(f"{key}: {e} (got {value!r})") from None
    raise TypeError(f"unsupported config field type {typ} for {key}")


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _set(cfg: Config, dotted: str, value, source: str) -> None:
    section, _, key = dotted.partition(".")
    sections = _section_types()
    if section not in sections:
        raise ConfigError(f"{source}: unknown section '{section}'{_did_you_mean(dotted)} (sections: "
                          f"{', '.join(sections)})")
    section_cls = sections[section]
    hints = typing.get_type_hints(section_cls)
    if key not in hints:
        raise ConfigError(f"{source}: unknown key '{dotted}'{_did_you_mean(dotted)} (keys of [{section}]: "
                          f"{', '.join(hints)})")
    setattr(getattr(cfg, section), key, _coerce(dotted, value, hints[key]))


def _did_you_mean(dotted: str) -> str:
    """'; did you mean optimizer.lr?' for a misspelt section or key, or a key in the wrong section
    ("" when nothing is close)."""
    section, _, key = dotted.partition(".")
    keys = {name: list(typing.get_type_hints(cls)) for name, cls in _section_types().items()}
    if section in keys:
        close = [f"{section}.{k}" for k in difflib.get_close_matches(key, keys[section], n=2, cutoff=0.6)]
    else:
        near = difflib.get_close_matches(section, list(keys), n=1, cutoff=0.6)
        close = [f"{near[0]}.{key}"] if near and key in keys[near[0]] else []
    close = close or [f"{name}.{key}" for name in keys if key in keys[name]]  # the right key, elsewhere
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _parse_cli(argv: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """Split argv into the --config path and (section.key, value) overrides."""
    config_path, overrides = None, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: unexpected argument {arg!r} (overrides look like --section.key value)")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"command line: --{name} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if name in ("config", "job.config_file"):
            config_path = value
        elif "." not in name:
            raise ConfigError(f"command line: --{name} is not of the form --section.key")
        else:
            overrides.append((name, value))
    return config_path, overrides


def load_config(argv: list[str] | None = None, world_size: int | None = None) -> Config:
    """defaults < TOML (--config) < --section.key overrides, then validated for `world_size` ranks."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(help_text())
        raise SystemExit(0)
    config_path, overrides = _parse_cli(argv)
    cfg = Config()
    if config_path is not None:
        try:
            with open(config_path, "rb") as f:
                toml = tomllib.load(f)
            for section, table in toml.items():
                if not isinstance(table, dict):
                    raise ConfigError(f"{config_path}: '{section}' must be a [section] table, not a bare key")
                for key, value in table.items():
                    _set(cfg, f"{section}.{key}", value, config_path)
        except FileNotFoundError:
            raise ConfigError(f"--config: no such file: {config_path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{config_path}: invalid TOML: {e}") from None
        except RecursionError:  # tomllib recurses once per nested array or inline table
            raise ConfigError(f"{config_path}: invalid TOML: nested too deeply to parse") from None
        except OSError as e:  # a folder, no permission
            raise ConfigError(f"--config: cannot read {config_path} ({e.strerror or e})") from None
    for dotted, value in overrides:
        _set(cfg, dotted, value, f"--{dotted}")
    given = {dotted for dotted, _ in overrides}
    # The data named on the command line replaces the TOML's other way of naming it.
    if "data.sources" in given and "data.path" not in given and cfg.data.sources:
        cfg.data.path = ""
    elif "data.path" in given and "data.sources" not in given and cfg.data.path:
        cfg.data.sources = ""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    fill_in_from_data(cfg)
    validate(cfg, world_size)
    return cfg


def fill_in_from_data(cfg: Config) -> None:
    """data.val_path left empty with data.val_interval set: <data.path>/val (or <folder>/val of a
    data.sources of one folder), mobilellm-prepare's split (model.vocab_size, which a resumed
    checkpoint also decides, is the trainer's: start_checks)."""
    from mobilellm_train.data.sources import parse_sources
    from mobilellm_train.errors import DataError

    d, base = cfg.data, cfg.data.path
    if not base and d.sources:
        try:
            sources = parse_sources(d.sources)
        except DataError:
            sources = []  # the check names it
        base = sources[0][0] if len(sources) == 1 else ""
    candidate = os.path.join(base, "val")
    if d.val_interval and not d.val_path and base and os.path.isfile(os.path.join(candidate, "manifest.json")):
        d.val_path = candidate


# ---------------------------------------------------------------------------------------------
# Output: --help text from the field docstrings, and the effective config as TOML.


def _field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (its docstring), read from the source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def help_text() -> str:
    lines = [
        "usage: mobilellm-train [--config FILE.toml] [--section.key VALUE | --section.key=VALUE ...]",
        "",
        "Precedence: defaults < TOML file < command line. Fields:",
    ]
    defaults = Config()
    for section, cls in _section_types().items():
        lines.append(f"\n[{section}]")
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            default = getattr(getattr(defaults, section), f.name)
            lines.append(f"  --{section}.{f.name} (default: {_toml_value(default)})")
            lines.append(f"      {docs.get(f.name, '')}")
    return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def to_toml(cfg: Config) -> str:
    out = []
    for section in _section_types():
        out.append(f"[{section}]")
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def parse_effective_config(text: str) -> Config:
    """A run folder's config.toml (as `to_toml` writes it) read back without validation: its
    paths may have moved since, and keys this version does not know are skipped. Text that is not
    TOML (too deeply nested included) raises ValueError."""
    cfg = Config()
    try:
        tables = tomllib.loads(text)
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise ValueError("invalid TOML: nested too deeply to parse") from None
    for section, table in tables.items():
        if not isinstance(table, dict):
            continue
        for key, value in table.items():
            try:
                _set(cfg, f"{section}.{key}", value, "config.toml")
            except ConfigError:
                pass
    return cfg
