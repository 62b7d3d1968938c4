"""Settings trees: validated dataclasses whose fields declare their own command-line flags.

One declaration per setting. A dataclass field made with `option(...)` holds the setting's default,
its flag (and any old spelling the flag had), its help and how its text is parsed; a field made
with `section(...)` nests another settings dataclass, shown as one argument group. From the root
class alone:

    add_arguments(parser, Root)         every flag, grouped by section, each default in its help
    from_args(Root, namespace)          the Root tree: the flags given over the declared defaults
    to_dict(tree) / from_dict(Root, d)  a JSON-able round trip (settings files, manifests)
    replace(tree, scale=2.0, **{"backend.name": "compiled"})
                                        a copy with leaves changed by name (when unique) or path

The dataclasses validate themselves in `__post_init__` (a one-line IGDSInputError), so a tree built
from flags, from a dict or in Python is checked the same way. Flags are declared with
`default=argparse.SUPPRESS`: the parsed namespace holds only what the user typed, so "not given"
needs no sentinel value, and a flag that does not apply to the run (`when=`, `switch=`) is refused
by name. guided-diffusion's `add_dict_to_argparser` / `args_to_dict` and EDM's keyword pass-through
are the model: the flags are generated, never copied by hand.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Iterator, Mapping

from .errors import IGDSInputError
from .limits import loads_json

_OPTION = "igds_option"
_SECTION = "igds_section"
_JSON_SUFFIX = ".__json__"
_NO_CONST = ("no const",)  # Flag.const's "none given" (None is a value a flag may store)
NOTE_PREFIX = "igds-fast: note:"


@dataclass(frozen=True)
class Flag:
    """Another flag that sets the same field (mutually exclusive with the field's own flag)."""

    name: str
    help: str
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    const: Any = _NO_CONST  # a bare flag storing this value instead of parsing one


@dataclass(frozen=True)
class OptionSpec:
    """What `option()` records next to a field (see there)."""

    flag: str | None
    help: str
    parse: Callable[[str], Any] | None
    metavar: str | None
    choices: tuple | None
    action: str | None
    old: tuple[str, ...]
    alternates: tuple[Flag, ...]
    default_text: str | None
    group: str | None


@dataclass(frozen=True)
class SectionSpec:
    """What `section()` records next to a field (see there)."""

    cls: type
    title: str | None
    when: tuple[str, Any, str] | None
    switch: str | None
    json_flag: str | None
    json_help: str | None
    exclude: tuple[str, ...]


def option(default: Any = MISSING, flag: str | None = None, *, help: str, parse: Callable[[str], Any] | None = None,
           metavar: str | None = None, choices=None, action: str | None = None, old: tuple[str, ...] = (),
           alternates: tuple[Flag, ...] = (), default_text: str | None = None, group: str | None = None,
           default_factory: Callable[[], Any] | Any = MISSING) -> Any:
    """A dataclass field that is one setting.

    default: the setting's default (MISSING: required; the flag is then required too).
    flag: its command-line flag ("--steps"); a name without dashes is a positional argument shown
        under that name; None = a setting of the Python API only.
    help: one sentence, shown by --help with the default appended.
    parse: text -> value (argparse's type=); choices: the allowed values.
    action: "store_true" (a False default set by the bare flag) or "store_false" (a True default
        cleared by the bare flag, e.g. --quiet for progress=True).
    old: earlier spellings of the flag, still accepted with a one-line note naming the new one.
    alternates: other flags setting the same field (e.g. --timestep-respacing for --steps); at most
        one of them may be given.
    default_text: how the help states the default, where the declared one is resolved later from
        the context (None fields: "250; 50 for a DiT prior").
    group: the argument group the flag is listed in, when not its section's.
    """
    spec = OptionSpec(flag, help, parse, metavar, None if choices is None else tuple(choices), action, tuple(old),
                      tuple(alternates), default_text, group)
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={_OPTION: spec})
    return dataclasses.field(default=default, metadata={_OPTION: spec})


def section(cls: type, title: str | None = None, *, when: tuple[str, Any, str] | None = None,
            switch: str | None = None, json_flag: str | None = None, json_help: str | None = None,
            exclude: tuple[str, ...] = (), required: bool = False,
            default_factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field holding a nested settings dataclass `cls` (one argument group, `title`).

    when: (sibling field, value, phrase) — the section applies only while the sibling setting has
        that value (e.g. ("name", "compiled", "--backend compiled")): otherwise the section keeps its
        defaults and any of its flags given is refused in one line ("--compile-dtype applies to
        --backend compiled only").
    switch: the name of one of `cls`'s fields whose flag turns the section on (e.g. "method" for
        --select): without it the section is None and its other flags are refused by name.
    json_flag: a flag taking any of the section's fields as one JSON object (e.g. --compile-options);
        the section's own flags override its keys.
    exclude: fields of `cls` this tree does not set (another of its settings does: the run's
        --batch-size, not CompileConfig.batch_size): no flag, no JSON key, no name for `replace`.
    required: the section has required settings, so the tree has no default for it.
    default_factory: how the tree's default section is made (default: `cls()`; None when `switch`).
    """
    spec = SectionSpec(cls, title, when, switch, json_flag, json_help, tuple(exclude))
    metadata = {_SECTION: spec}
    if required:
        return dataclasses.field(metadata=metadata)
    if switch is not None:
        return dataclasses.field(default=None, metadata=metadata)
    return dataclasses.field(default_factory=default_factory or cls, metadata=metadata)


# ---- reading the declarations -----------------------------------------------------------------


def _fields(cls: type, exclude: tuple[str, ...] = ()) -> Iterator[tuple[dataclasses.Field, OptionSpec | None,
                                                                         SectionSpec | None]]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a settings dataclass")
    for f in dataclasses.fields(cls):
        if f.name not in exclude:
            yield f, f.metadata.get(_OPTION), f.metadata.get(_SECTION)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def flags_of(cls: type, path: str = "", exclude: tuple[str, ...] = (), old: bool = False):
    """(dest, flag) of every flag the tree under `cls` declares, depth first, in declaration order;
    with old=True the flag names alone, earlier spellings included. Positional arguments are not flags."""
    for f, opt, sec in _fields(cls, exclude):
        if opt is not None and opt.flag is not None and opt.flag.startswith("-"):
            names = [opt.flag, *(alternate.name for alternate in opt.alternates), *(opt.old if old else ())]
            for name in names:
                yield name if old else (path + f.name, name)
        elif sec is not None:
            if sec.json_flag is not None:
                yield sec.json_flag if old else (path + f.name + _JSON_SUFFIX, sec.json_flag)
            yield from flags_of(sec.cls, path + f.name + ".", sec.exclude, old)


def leaf_paths(cls: type, path: str = "", exclude: tuple[str, ...] = ()) -> Iterator[str]:
    """The dotted path of every setting (option field) under `cls`."""
    for f, opt, sec in _fields(cls, exclude):
        if sec is not None:
            yield from leaf_paths(sec.cls, path + f.name + ".", sec.exclude)
        else:
            yield path + f.name


def section_paths(cls: type, path: str = "") -> Iterator[str]:
    """The dotted path of every section under `cls`."""
    for f, _, sec in _fields(cls):
        if sec is not None:
            yield path + f.name
            yield from section_paths(sec.cls, path + f.name + ".")


# ---- the command line ---------------------------------------------------------------------------


class _OldSpelling(argparse.Action):
    """An earlier spelling of a flag: stores like the flag and says, once, what it is called now."""

    def __init__(self, option_strings, dest, new_flag: str, store_const=MISSING, **kwargs):
        self.new_flag, self.store_const = new_flag, store_const
        if store_const is not MISSING:
            kwargs["nargs"] = 0
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{NOTE_PREFIX} {option_string} is now spelled {self.new_flag}", file=sys.stderr)
        setattr(namespace, self.dest, self.store_const if self.store_const is not MISSING else values)


def _help_text(spec: OptionSpec, default: Any) -> str:
    if spec.default_text is not None:
        shown = spec.default_text
    elif default is MISSING:
        return f"{spec.help} (required)"
    elif spec.action in ("store_true", "store_false") or default is None:
        return spec.help
    else:
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
    return f"{spec.help} (default: {shown})"


def _json_object(flag: str) -> Callable[[str], dict]:
    def parse(text: str) -> dict:
        try:
            value = loads_json(text, "the value")
        except IGDSInputError as exc:  # argparse shows an ArgumentTypeError's own message (after the flag)
            raise argparse.ArgumentTypeError(str(exc).removeprefix("the value is ").removeprefix("the value: ")) from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError("must be a JSON object of setting names and values")
        return value

    parse.__name__ = f"{flag} JSON"
    return parse


def _keeping_reasons(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` for argparse's type=: argparse replaces a ValueError's text (IGDSInputError is one) by
    "invalid <name> value", so a parser's own reason (a missing file, a negative beta) is passed on as an
    ArgumentTypeError, whose text argparse prints after the flag."""
    if parse in (int, float, str):
        return parse  # their ValueError says nothing more than argparse's own message

    def parse_keeping_reason(text: str):
        try:
            return parse(text)
        except IGDSInputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse_keeping_reason.__name__ = getattr(parse, "__name__", "value")
    return parse_keeping_reason


def add_arguments(parser: argparse.ArgumentParser, cls: type, path: str = "", group=None, groups=None,
                  exclude: tuple[str, ...] = ()) -> None:
    """Declare the flags of the tree under `cls` on `parser` (see the module docstring)."""
    groups = {} if groups is None else groups
    target = group if group is not None else parser
    for f, opt, sec in _fields(cls, exclude):
        dest = path + f.name
        if sec is not None:
            child_group = target
            if sec.title is not None:
                child_group = groups.get(sec.title) or groups.setdefault(sec.title, parser.add_argument_group(sec.title))
            add_arguments(parser, sec.cls, dest + ".", child_group, groups, sec.exclude)
            if sec.json_flag is not None:
                child_group.add_argument(sec.json_flag, dest=dest + _JSON_SUFFIX, default=argparse.SUPPRESS,
                                         metavar="JSON", type=_json_object(sec.json_flag), help=sec.json_help)
            continue
        if opt is None or opt.flag is None:
            continue
        where = target
        if opt.group is not None:
            where = groups.get(opt.group) or groups.setdefault(opt.group, parser.add_argument_group(opt.group))
        default = _default_of(f)
        kwargs: dict[str, Any] = dict(dest=dest, default=argparse.SUPPRESS, help=_help_text(opt, default))
        if opt.action is not None:
            kwargs["action"] = opt.action
        else:
            if opt.parse is not None:
                kwargs["type"] = _keeping_reasons(opt.parse)
            if opt.choices is not None:
                kwargs["choices"] = opt.choices
            else:
                kwargs["metavar"] = opt.metavar or f.name.upper()
        if opt.alternates:
            # One of the flags of the setting at most (exactly one when it is required).
            exclusive = where.add_mutually_exclusive_group(required=default is MISSING)
            exclusive.add_argument(opt.flag, **kwargs)
            for alternate in opt.alternates:
                if alternate.const is not _NO_CONST:
                    exclusive.add_argument(alternate.name, dest=dest, default=argparse.SUPPRESS, help=alternate.help,
                                           action="store_const", const=alternate.const)
                else:
                    exclusive.add_argument(alternate.name, dest=dest, default=argparse.SUPPRESS,
                                           help=alternate.help, type=_keeping_reasons(alternate.parse) if alternate.parse else None,
                                           metavar=alternate.metavar or f.name.upper())
        elif not opt.flag.startswith("-"):  # a positional argument, shown as `flag`
            kwargs.pop("dest")
            kwargs.pop("default")
            kwargs["metavar"] = opt.flag
            where.add_argument(dest, **kwargs)
        else:
            if default is MISSING:
                kwargs["required"] = True
            where.add_argument(opt.flag, **kwargs)
        for old in opt.old:
            old_kwargs = {k: v for k, v in kwargs.items() if k not in ("action", "required", "help")}
            if opt.action in ("store_true", "store_false"):
                old_kwargs["store_const"] = opt.action == "store_true"
            where.add_argument(old, action=_OldSpelling, new_flag=opt.flag, help=argparse.SUPPRESS, **old_kwargs)


def given_dests(namespace: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """{dest: value} of the flags given (the namespace of a parser made by `add_arguments`)."""
    values = vars(namespace) if isinstance(namespace, argparse.Namespace) else dict(namespace)
    return {key: value for key, value in values.items() if key not in ("handler", "command")}


def _given_flags(cls: type, given: Mapping[str, Any], path: str) -> list[str]:
    """The flags of the tree under `cls` (at `path`) that were given, in declaration order; one flag
    per setting (a field's own flag stands for its alternates)."""
    found, seen = [], set()
    for dest, flag in flags_of(cls, path):
        if dest in given and dest not in seen:
            seen.add(dest)
            found.append(flag)
    return found


def _refusal(flags: list[str], phrase: str) -> IGDSInputError:
    verb = "applies" if len(flags) == 1 else "apply"
    return IGDSInputError(f"{', '.join(flags)} {verb} to {phrase} only")


def from_args(cls: type, namespace: argparse.Namespace | Mapping[str, Any], base: Any = None, path: str = "") -> Any:
    """The tree of `cls` from the flags given (a namespace of `add_arguments`' parser), over `base`
    (the tree whose values stand where no flag was given; default: the declared defaults)."""
    given = given_dests(namespace)
    changes: dict[str, Any] = {}

    def current(name: str) -> Any:  # a sibling setting as it stands so far
        if name in changes:
            return changes[name]
        return getattr(base, name) if base is not None else _declared_default(cls, name)

    for f, opt, sec in _fields(cls):
        dest = path + f.name
        if opt is not None:
            if dest in given:
                changes[f.name] = given[dest]
            continue
        if sec is None:
            continue
        child_given = _given_flags(sec.cls, given, dest + ".")
        json_values = given.get(dest + _JSON_SUFFIX)
        if json_values is not None:
            child_given.insert(0, sec.json_flag)
        if sec.when is not None:
            sibling, value, phrase = sec.when
            if current(sibling) != value:
                if child_given:
                    raise _refusal(child_given, phrase)
                continue  # the section keeps its default (or the base's)
        if sec.switch is not None and f"{dest}.{sec.switch}" not in given and current(f.name) is None:
            if child_given:  # the section's flags without the flag that turns it on
                raise _refusal(child_given, f"{_flag_of_field(sec.cls, sec.switch)} {_choices_text(sec.cls, sec.switch)}"
                               .strip())
            continue
        # What stands where no flag of the section is given: the base tree's section, else the section's
        # declared default (a required section has none: it is built from its flags alone).
        child_base = current(f.name)
        child_base = None if child_base is MISSING else child_base
        if json_values is not None:
            child_base = _apply_json(sec.cls, child_base, json_values, sec.json_flag, sec.exclude)
        if not child_given or (json_values is not None and len(child_given) == 1):
            if child_base is not None:
                changes[f.name] = child_base
                continue
        changes[f.name] = from_args(sec.cls, given, base=child_base, path=dest + ".")
    if base is not None:
        return dataclasses.replace(base, **changes)
    return cls(**changes)


def given_settings(cls: type, namespace: argparse.Namespace | Mapping[str, Any], path: str = "") -> dict[str, Any]:
    """{field: value} of the settings of the flat section `cls` (at `path`) whose flags were given."""
    given = given_dests(namespace)
    return {f.name: given[path + f.name] for f, opt, _ in _fields(cls) if opt is not None and path + f.name in given}


def _declared_default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return _default_of(f)
    raise KeyError(name)


def _flag_of_field(cls: type, name: str) -> str:
    for f, opt, _ in _fields(cls):
        if f.name == name and opt is not None and opt.flag is not None:
            return opt.flag
    return name


def _choices_text(cls: type, name: str) -> str:
    for f, opt, _ in _fields(cls):
        if f.name == name and opt is not None and opt.choices is not None and len(opt.choices) == 1:
            return str(opt.choices[0])
    return ""


def _apply_json(cls: type, base: Any, values: Mapping[str, Any], flag: str, exclude: tuple[str, ...]) -> Any:
    """`base` (or `cls()`) with the fields of a JSON object (--compile-options); unknown names refused."""
    known = [f.name for f in dataclasses.fields(cls) if f.name not in exclude]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise IGDSInputError(f"{flag}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if base is None:
        return cls(**values)
    return dataclasses.replace(base, **values)


def require_paths(*flags_and_values: tuple[str, Any]) -> None:
    """Refuse, in one line naming the flag, the first required path that is not a non-empty string
    (argparse enforces required flags; a tree built in Python is checked here)."""
    for flag, value in flags_and_values:
        if not isinstance(value, str) or not value:
            raise IGDSInputError(f"give {flag}")


# ---- dictionaries ------------------------------------------------------------------------------


def to_dict(tree: Any) -> Any:
    """A JSON-able copy of a settings tree: sections as dicts, tuples as lists."""
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return {f.name: to_dict(getattr(tree, f.name)) for f in dataclasses.fields(tree)}
    if isinstance(tree, Mapping):
        return {str(key): to_dict(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [to_dict(value) for value in tree]
    return tree


def from_dict(cls: type, data: Mapping[str, Any], what: str | None = None) -> Any:
    """The tree of `cls` from `to_dict`'s form (missing keys: the declared defaults; unknown: refused)."""
    what = what or cls.__name__
    if not isinstance(data, Mapping):
        raise IGDSInputError(f"{what} must be a JSON object, got {type(data).__name__}")
    known = {f.name: (f, opt, sec) for f, opt, sec in _fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise IGDSInputError(f"{what}: unknown setting(s) {', '.join(unknown)}")
    values = {}
    for name, value in data.items():
        f, opt, sec = known[name]
        default = _default_of(f)
        if sec is not None and value is not None:
            values[name] = from_dict(sec.cls, value, f"{what}.{name}")
        elif dataclasses.is_dataclass(default) and isinstance(value, Mapping):  # a nested config, not a section
            values[name] = from_dict(type(default), value, f"{what}.{name}")
        elif isinstance(value, list) and isinstance(default, tuple):
            values[name] = tuple(value)
        else:
            values[name] = value
    return cls(**values)


def replace(tree: Any, **changes: Any) -> Any:
    """A copy of `tree` with settings changed, each named by its field (when that name is unique in
    the tree) or by its dotted path ("backend.name", also spelled backend__name); a section's path
    takes a whole section ("backend.compile": CompileConfig(...)), and any other value names the one
    setting of that name (DistillConfig's sampler="ddim" is sampler.sampler). A change inside a section that is
    None (a switched-off section) creates it from its defaults."""
    leaves, sections = list(leaf_paths(type(tree))), list(section_paths(type(tree)))
    paths = leaves + sections
    resolved: dict[str, Any] = {}
    for key, value in changes.items():
        path = key.replace("__", ".")
        if path in sections and not (isinstance(value, Mapping) or dataclasses.is_dataclass(value) or value is None):
            # Not a section's value: the setting of that name inside it (sampler="ddim" is sampler.sampler).
            matches = [p for p in leaves if p.rsplit(".", 1)[-1] == path]
            path = matches[0] if len(matches) == 1 else path
        if path not in paths:
            matches = [p for p in paths if p.rsplit(".", 1)[-1] == path]
            if not matches:
                raise IGDSInputError(f"{type(tree).__name__} has no setting {key!r}")
            if len(matches) > 1:
                raise IGDSInputError(f"{key!r} is ambiguous in {type(tree).__name__}: say {' or '.join(matches)}")
            path = matches[0]
        resolved[path] = value
    return _replace_paths(tree, type(tree), resolved)


def _replace_paths(tree: Any, cls: type, changes: Mapping[str, Any]) -> Any:
    """`tree` (None: `cls`'s defaults) with `changes` (paths relative to it) applied."""
    direct = {path: value for path, value in changes.items() if "." not in path}
    nested: dict[str, dict[str, Any]] = {}
    for path, value in changes.items():
        if "." in path:
            head, rest = path.split(".", 1)
            nested.setdefault(head, {})[rest] = value
    sections = {f.name: sec for f, _, sec in _fields(cls) if sec is not None}
    for name, value in direct.items():
        if name in sections and isinstance(value, Mapping):  # a section given as its dict form
            direct[name] = from_dict(sections[name].cls, value)
    for name, inner in nested.items():
        direct[name] = _replace_paths(None if tree is None else getattr(tree, name), sections[name].cls, inner)
    if tree is None:
        return cls(**direct)
    return dataclasses.replace(tree, **direct)


__all__ = ["Flag", "NOTE_PREFIX", "add_arguments", "flags_of", "from_args", "from_dict", "given_dests",
           "given_settings", "leaf_paths", "option", "replace", "require_paths", "section", "section_paths",
           "to_dict"]
