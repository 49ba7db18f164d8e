"""One config system: frozen dataclasses whose fields declare their own flag and help text.

A config is a dataclass of settings, or of *sections* (fields that are themselves such dataclasses:
`model`, `optim`, `run`, ...). Each setting is declared once with `option(default, "help")`; from that one
declaration come its default, its validation (the dataclass's `__post_init__`), its `--flag` (the field name
with dashes, or `flag=`; `aliases=` keeps old spellings), its help text and its key in config files.

    Cfg.from_dict({"optim": {"lr": 3e-4}})  # nested dict (a config file + flags) -> validated config
    config.to_dict()                        # -> the nested dict (what a run saves as config.json)
    add_flags(parser, cls)                  # every setting as a flag, dest "section.key"
    from_flat(Cfg, lr=3e-4)                 # the keyword form of the flags (code, tests)
    from_args(Cfg, args)                    # --config FILE, then the flags given on the command line
    resolve_device(config.device)           # a --device value checked against this machine

Errors are ConfigErrors naming the setting ("optim.lr") so the CLI can name its flag. Leaf module: it
imports nothing from rlhf_fast but `errors`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from pathlib import Path

from rlhf_fast.errors import ConfigError

_MISSING = dataclasses.MISSING


def option(default=_MISSING, help: str = "", *, flag: str | None = None, aliases: tuple[str, ...] = (),
           choices=None, metavar: str | None = None, cli: bool = True, append: bool = False, factory=None):
    """A dataclass field that is also a command-line flag. `cli=False`: a setting for config files and code only
    (e.g. one derived by the config); `append=True` (tuple fields): the flag repeats (`--prompt a --prompt b`)
    instead of taking several values; `factory`: a default_factory (mutable or per-config defaults)."""
    meta = {"help": help, "flag": flag, "aliases": tuple(aliases), "choices": choices, "metavar": metavar, "cli": cli,
            "append": append}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(factory, help: str = ""):
    """A field holding a section (a settings dataclass); `factory` gives this config's defaults for it."""
    return dataclasses.field(default_factory=factory, metadata={"help": help, "section": True})


def is_section(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("section"))


def _default(f: dataclasses.Field):
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _plain_type(tp):
    """(base type, is_tuple) of an annotation: `int | None` -> (int, False), `tuple[str, ...]` -> (str, True)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else str
    if typing.get_origin(tp) is tuple:
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return (args[0] if args else str), True
    return tp, False


class Config:
    """Base of config dataclasses and sections: `from_dict` / `to_dict` (the one way for every config)."""

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None):
        return build(cls, d, source=source)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- dicts <-> configs ----------------------------------------------------------------------------------


def build(cls, d: dict | None = None, *, base=None, source: str | None = None, _prefix: str = ""):
    """A validated `cls` from nested dict `d` over `base` (an instance; default: cls's defaults).

    Invalid values raise ConfigError with `where` = the setting ("optim.lr"); unknown keys and non-mapping
    sections name the setting and `source` (the config file, when there is one)."""
    d = dict(d or {})
    hints = _hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"unknown setting {_prefix}{unknown[0]}; known{' in ' + _prefix[:-1] if _prefix else ''}: "
                          f"{', '.join(sorted(names))}", source or f"{_prefix}{unknown[0]}")
    kwargs = {}
    for name, f in names.items():
        current = getattr(base, name) if base is not None else _default(f)
        if is_section(f):
            value = d.get(name, {})
            if not isinstance(value, dict):
                raise ConfigError(f"section {_prefix}{name} must be a mapping, got {type(value).__name__}",
                                  source or f"{_prefix}{name}")
            kwargs[name] = build(type(current), value, base=current, source=source, _prefix=f"{_prefix}{name}.")
            continue
        if name in d:
            kwargs[name] = checked_value(d[name], hints[name], f"{_prefix}{name}")
        elif current is _MISSING:
            raise ConfigError("a value is required", f"{_prefix}{name}")
        else:
            kwargs[name] = current
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a section's own check names a setting of its own: make it the full key
        raise ConfigError(e.what, f"{_prefix}{e.where}" if e.where else _prefix[:-1] or None) from e
    except (ValueError, TypeError) as e:  # a check without a key: the section
        raise ConfigError(" ".join(str(e).split()), _prefix[:-1] or source) from e


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def checked_value(value, hint, key: str):
    """`value` as the type its setting declares (a list for a tuple setting becomes a tuple, an int for a float
    setting a float, a path a str), or a ConfigError naming `key`: a config file's `{"lr": "fast"}` must fail
    here with its key, not later as a TypeError deep in the run."""
    typ, many = _plain_type(hint)
    optional = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    if value is None and optional and type(None) in typing.get_args(hint):
        return None
    if many:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"must be a list, got {value!r} ({type(value).__name__})", key)
        return tuple(_checked_scalar(v, typ, key) for v in value)
    return _checked_scalar(value, typ, key)


def _checked_scalar(value, typ, key: str):
    if typ not in _TYPE_NAMES:  # a type the config system has no rule for: the section's own check decides
        return value
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool)
          or isinstance(value, float) and value.is_integer(),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, (str, os.PathLike))}[typ]
    if not ok:
        raise ConfigError(f"must be {_TYPE_NAMES[typ]}, got {value!r} ({type(value).__name__})", key)
    return os.fspath(value) if typ is str else typ(value)


def load_config_file(path) -> dict:
    """The nested dict in a .json file, or a .yaml/.yml file when PyYAML is installed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", str(path))
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError("YAML config files need PyYAML (pip install pyyaml); or write the config as JSON",
                              str(path)) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise ConfigError(f"not valid YAML: {getattr(e, 'problem', e)}",
                              f"{path}:{mark.line + 1}" if mark else str(path)) from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"not valid JSON: {e.msg}", f"{path}:{e.lineno}") from e
    if not isinstance(data, dict):
        raise ConfigError("a config file must hold a mapping of settings / sections", str(path))
    return data


def set_key(d: dict, key: str, value) -> dict:
    """A copy of nested dict `d` with "section.key" (any depth) set to `value`."""
    out = dict(d)
    head, _, rest = key.partition(".")
    if rest:
        sub = out.get(head, {})
        out[head] = set_key(sub if isinstance(sub, dict) else {}, rest, value)
    else:
        out[head] = value
    return out


# --- flags ----------------------------------------------------------------------------------------------


def iter_options(cls, prefix: str = "", base=None):
    """(key, field, type hint, default) of every setting of `cls`, sections flattened ("optim.lr")."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        default = getattr(base, f.name) if base is not None else _default(f)
        if is_section(f):
            yield from iter_options(type(default), f"{prefix}{f.name}.", default)
        else:
            yield f"{prefix}{f.name}", f, hints[f.name], default


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _hidden(key: str, hidden) -> bool:
    return any(key == h or key.startswith(h + ".") for h in hidden)


def add_flags(parser: argparse.ArgumentParser, cls, hidden=()) -> dict[str, str]:
    """`--config` plus one flag per setting of `cls`; returns {key: flag}. Left out: cli=False fields, keys (or
    whole sections) in `hidden` and in the class's `cli_hidden`. A class's `cli_flags` ({key: flag}) renames a
    flag for that command (the declared one stays an alias). Flags left off the command line are absent from
    the namespace: the config file, then the defaults decide."""
    parser.add_argument("--config", metavar="FILE", help="JSON (or YAML, with PyYAML) file of settings, e.g. a "
                        "run's config.json; flags given here override it")
    hidden = (*hidden, *getattr(cls, "cli_hidden", ()))
    renamed = getattr(cls, "cli_flags", {})
    flags = {}
    for key, f, hint, default in iter_options(cls):
        meta = f.metadata
        if _hidden(key, hidden) or meta.get("cli") is False:
            continue
        if not meta.get("help"):
            raise TypeError(f"{cls.__name__}.{key} has no help text: declare it with option(default, help)")
        flag = renamed.get(key, flag_of(f))
        names = list(dict.fromkeys([flag, flag_of(f), *meta.get("aliases", ())]))
        text = meta["help"]
        if default not in (_MISSING, None, ()) and not isinstance(default, bool):
            text += f" (default: {','.join(map(str, default)) if isinstance(default, tuple) else default})"
        kwargs = dict(dest=key, default=argparse.SUPPRESS, help=text.replace("%", "%%"))
        typ, many = _plain_type(hint)
        if typ is bool:
            if default is not _MISSING and default is not None:
                kwargs["help"] += f" (default: {'on' if default else 'off'})"
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            if many:
                kwargs.update(action="append") if meta.get("append") else kwargs.update(nargs="+")
            parser.add_argument(*names, type=typ if typ in (int, float) else str, choices=meta.get("choices"),
                                metavar=meta.get("metavar") or key.rsplit(".", 1)[-1].upper(), **kwargs)
        flags[key] = flag
    return flags


def from_flat(cls, **settings):
    """`cls` from settings named as their flags are, without the section (`lr=1e-3, iterations=4`): the keyword
    form of a command line, for code and tests. A name shared by two visible settings is an error."""
    hidden = getattr(cls, "cli_hidden", ())
    keys: dict[str, list[str]] = {}
    for key, *_ in iter_options(cls):
        if not _hidden(key, hidden):
            keys.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    d: dict = {}
    for name, value in settings.items():
        found = keys.get(name, [])
        if len(found) != 1:
            raise ConfigError(f"{'ambiguous' if found else 'unknown'} setting {name!r} of {cls.__name__}"
                              + (f": {found}" if found else ""), name)
        d = set_key(d, found[0], value)
    return build(cls, d)


def from_args(cls, args: argparse.Namespace, flags: dict[str, str] | None = None, base=None):
    """`cls` from `args.config` (a file; may be None) with the flags given on the command line on top."""
    path = getattr(args, "config", None)
    d = load_config_file(path) if path else {}
    for key in flags if flags is not None else [k for k, *_ in iter_options(cls)]:
        if hasattr(args, key):
            d = set_key(d, key, getattr(args, key))
    return build(cls, d, base=base, source=path)


def resolve_device(name: str | None, where: str = "device"):
    """The torch.device `name` names (None: cuda when available, else cpu). A ConfigError naming the setting
    (shown as its flag) when it is no device or this machine has none of it: never a traceback later, deep in
    a memory plan or a `.to(device)`."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{name!r} is not a device (cpu, cuda, cuda:1, ...)", where) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", built without CUDA")
            raise ConfigError(f"{name!r}: this machine has no usable CUDA device ({built})", where)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)", where)
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{name!r}: MPS is not available on this machine", where)
    elif device.type != "cpu":
        raise ConfigError(f"{name!r}: device type {device.type!r} is not supported (cpu, cuda, mps)", where)
    return device
