"""What the command lines of train.py, eval.py, online.py and bench.py share: a --help layout,
numbers checked as they are parsed, and options declared once, as dataclass fields."""
import argparse
import math
from dataclasses import field, fields


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the module docstring's layout and shows each flag's default (None and False,
    an unset flag, are said in words by the help text where they mean something)."""

    def _get_help_string(self, action):
        return (action.help if action.default is None or action.default is False
                else super()._get_help_string(action))


def number(kind, low=None, *, above=None, high=None):
    """argparse type: an int or float (`kind`) >= low, > above, <= high; anything else is argparse's
    one-line error naming the flag, e.g. 'argument --lr: must be > 0, got 0'."""
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if kind is float and not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        for bad, rule in ((low is not None and x < low, f">= {low}"),
                          (above is not None and x <= above, f"> {above}"),
                          (high is not None and x > high, f"<= {high}")):
            if bad:
                raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return x
    parse.__name__ = kind.__name__  # argparse's fallback message names the type
    return parse


def option(default, help, *, group=None, flag=None, **argparse_kwargs):
    """A dataclass field that is also a command-line option: its default, its --help text, the
    argument group it is listed under, its flag (default: --field-name) and any other keyword of
    argparse's add_argument (type, choices, action). A bool field defaulting to False is a
    store_true switch unless `action` says otherwise."""
    meta = dict(help=help, group=group, flag=flag, argparse=argparse_kwargs)
    return field(default=default, metadata={"option": meta})


def add_options(parser, config_class, defaults):
    """Add every `option` field of config_class to parser, in the order the fields are declared,
    each under its group and with its default taken from `defaults` (an instance of config_class:
    the defaults can depend on the command line, as the small world's do)."""
    groups = {None: parser}
    for f in fields(config_class):
        meta = f.metadata.get("option")
        if meta is None:  # a field that is set by the program, not by a flag
            continue
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        kwargs = dict(meta["argparse"])
        if f.default is False and "action" not in kwargs:
            kwargs["action"] = "store_true"
        else:
            kwargs["default"] = getattr(defaults, f.name)
        flag = _flag(f)
        dest = {} if flag[2:].replace("-", "_") == f.name else {"dest": f.name}
        groups[meta["group"]].add_argument(flag, help=meta["help"], **dest, **kwargs)
    return parser


def flag_of(config_class, name) -> str:
    """The command-line flag of a config field (for messages that name it)."""
    for f in fields(config_class):
        if f.name == name:
            return _flag(f)
    raise KeyError(name)


def _flag(f) -> str:
    """A field's flag: the one its option names, else --field-name."""
    meta = f.metadata.get("option") or {}
    return meta.get("flag") or "--" + f.name.replace("_", "-")

