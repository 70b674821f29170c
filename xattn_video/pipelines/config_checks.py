"""Checks shared by the jobs' YAML configs (``generate``, ``videomme``): one place for how a bad value is
reported (the key path, the value, what is allowed) and for the XAttention settings both accept."""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from xattn_video.core.config import check_backend, check_block_size, check_stride, check_threshold

# XAttention settings every job's config accepts (each job adds its own, e.g. warmup_steps or min_len)
COMMON_XATTN_KEYS = ("threshold", "stride", "block_size", "backend", "estimate_fp8")


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names the key path, the value and what is allowed."""


def fail(path: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{path} = {value!r} is not allowed: {allowed}")


def check_keys(section: Any, path: str, allowed: tuple[str, ...] | list[str], why: str = "") -> dict:
    """``section`` as a mapping whose keys are all ``allowed`` (a close match is suggested for a typo)."""
    if not isinstance(section, dict):
        raise fail(path, section, f"must be a mapping with keys {', '.join(allowed)}")
    for key in section:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f"; did you mean {path + '.' if path else ''}{close[0]}?" if close else ""
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{where} is not a known key: allowed keys are {', '.join(allowed)}{why}{hint}")
    return section


def check_int(path: str, value: Any, lo: int | None = None, hi: int | None = None, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(path, value, what or "must be an integer")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise fail(path, value, what or f"must be an integer {bounds}")
    return value


def check_num(path: str, value: Any, lo: float, what: str, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(path, value, what)
    if value < lo or (strict and value == lo):
        raise fail(path, value, what)
    return float(value)


def check_bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise fail(path, value, "must be true or false")
    return value


def check_opt_str(path: str, value: Any, what: str = "must be a string or null") -> str | None:
    if value is not None and not isinstance(value, str):
        raise fail(path, value, what)
    return value


def common_xattn_setting(path: str, key: str, value: Any, block_size: int) -> Any:
    """One of :data:`COMMON_XATTN_KEYS`, checked by the functions :class:`xattn_video.XAttnConfig` uses."""
    try:
        if key == "threshold":
            return check_threshold(value)
        if key == "block_size":
            return check_block_size(value)
        if key == "stride":
            return check_stride(value, block_size)
        if key == "backend":
            return check_backend(value)
    except (TypeError, ValueError) as e:
        raise fail(path, value, str(e)) from None
    if key == "estimate_fp8":
        if not (isinstance(value, bool) or value == "auto"):
            raise fail(path, value, "true, false or auto (score blocks on float8 copies of q and k; auto: on GPUs "
                       "with float8 tensor cores)")
        return value
    raise KeyError(key)


def string_override(key: str, raw: str) -> dict:
    """A string-valued key taken verbatim (``output.naming={slug}`` is a template, not a YAML mapping)."""
    value: str | None = raw
    if raw in ("null", "~"):
        value = None
    elif len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        value = raw[1:-1]
    layer: dict = {}
    node = layer
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return layer


VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def parse_variants(
    a: Any,
    *,
    keys: tuple[str, ...],
    setting: Callable[[str, str, Any, int], Any],
    make: Callable[..., Any],
    modes: tuple[str, ...],
    reserved: tuple[str, ...] = (),
) -> tuple:
    """The ``attention`` section shared by the jobs: XAttention settings (``keys``, each checked by
    ``setting(path, key, value, block_size)``) that every ``xattn`` variant inherits unless it sets its own,
    ``variants`` (name -> {mode, settings}; modes other than xattn take no settings) and ``select`` (run only
    these). Returns ``make(name=..., mode=..., **settings)`` for each selected variant, in order."""
    check_keys(a, "attention", (*keys, "select", "variants"))
    shared_block = setting("attention.block_size", "block_size", a["block_size"], 128)
    shared = {k: setting(f"attention.{k}", k, a[k], shared_block) for k in keys}
    variants = a["variants"]
    if not isinstance(variants, dict) or not variants:
        raise fail("attention.variants", variants, f"a mapping of variant name -> {{mode: {'|'.join(modes)}, ...}}")
    out = []
    for name, spec in variants.items():
        path = f"attention.variants.{name}"
        if not isinstance(name, str) or not VARIANT_NAME.match(name) or name in reserved:
            not_these = f"; not {' or '.join(reserved)}" if reserved else ""
            raise fail(path, name, "a variant name of letters, digits, _ and - (it names a folder; no dots, so "
                                   f"overrides can reach it{not_these})")
        spec = {} if spec is None else spec
        if not isinstance(spec, dict):
            raise fail(path, spec, "a mapping like {mode: xattn, threshold: 0.95}")
        mode = spec.get("mode")
        if mode not in modes:
            raise fail(f"{path}.mode", mode, f"one of {', '.join(modes)}")
        if mode != "xattn":
            check_keys(spec, path, ("mode",), f" (mode {mode} has no XAttention settings)")
            out.append(make(name=name, mode=mode))
            continue
        check_keys(spec, path, ("mode", *keys))
        block = setting(f"{path}.block_size", "block_size", spec.get("block_size", shared["block_size"]), 128)
        values = {}
        for key in keys:
            where = f"{path}.{key}" if key in spec else f"attention.{key}"
            values[key] = setting(where, key, spec[key] if key in spec else shared[key], block)
        out.append(make(name=name, mode=mode, **values))
    select = a["select"]
    if select is not None:
        names = [v.name for v in out]
        select = [select] if isinstance(select, str) else select
        if not isinstance(select, list) or not select:
            raise fail("attention.select", a["select"], f"null or a non-empty list of variant names from {names}")
        for i, s in enumerate(select):
            if s not in names:
                raise fail(f"attention.select[{i}]", s, f"one of the variants {names}")
        out = [v for v in out if v.name in select]
    return tuple(out)


def split_args(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """A job's positionals ``[CONFIG.yaml] [key=value ...]``: a first item without '=' is the config file."""
    items = list(items)
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def run_config_command(args: Any, load_config: Callable, to_yaml: Callable, job: Callable[[Any], Any]) -> Any:
    """The front of every config-driven command: ``args.args`` is ``[CONFIG.yaml] [key=value ...]``; with
    ``--print-config`` the resolved config is printed and None returned, else ``job(config)``'s result. A
    ConfigError, from loading or from the job, becomes the CLI's one-line error."""
    from xattn_video.cli import CommandError

    config_path, overrides = split_args(args.args)
    try:
        cfg = load_config(config_path, overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return None
        return job(cfg)
    except ConfigError as e:
        raise CommandError(str(e)) from None


def parse_overrides(overrides: list[str], string_keys: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """Each ``key=value`` becomes its own nested mapping, so that each can be checked and merged in order.

    Values are YAML (``seeds=[0,1]``, ``model.vae_tiling=true``) except for ``string_keys``, which are taken
    verbatim (``null`` still means null).
    """
    from omegaconf import OmegaConf

    layers = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not allowed: write key=value, e.g. attention.threshold=0.95")
        key, raw = (part.strip() for part in item.split("=", 1))
        if not key or not re.fullmatch(r"[A-Za-z0-9_.\-]+", key):
            raise ConfigError(f"override {item!r} is not allowed: the key must be a dotted path like model.id")
        if key in string_keys:
            layers.append((item, string_override(key, raw)))
            continue
        try:
            layer = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
        except Exception as e:  # YAML scanner errors as well as OmegaConf's
            first = " ".join(str(e).split())
            raise ConfigError(f"override {item!r} is not allowed: the value is not valid YAML ({first})") from None
        layers.append((item, layer))
    return layers


def resolve_layers(
    default: Any,
    config_path: str | os.PathLike | None,
    overrides: list[str] | tuple[str, ...],
    *,
    merge_layer: Callable[[Any, dict, str], Any],
    string_keys: tuple[str, ...] = (),
    normalize: Callable[[dict], dict] = lambda layer: layer,
) -> dict:
    """The embedded default (an OmegaConf mapping), then the YAML file, then the ``key=value`` overrides, merged
    and resolved into a plain dict for the job's ``validate``. A file, or an override of ``attention.variants``
    as a whole, goes through ``merge_layer`` (which may replace rather than add); other overrides edit one key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = default
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} is not allowed: no such file")
        try:
            layer = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        except Exception as e:  # YAML syntax errors come in several types
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        if layer is None:
            layer = {}
        if not isinstance(layer, dict):
            raise ConfigError(f"config file {str(path)!r} is not allowed: the top level must be a mapping")
        cfg = merge_layer(cfg, layer, str(path))
    for item, layer in parse_overrides(list(overrides), string_keys):
        if item.split("=", 1)[0].strip() == "attention.variants":
            cfg = merge_layer(cfg, layer, f"override {item!r}")
            continue
        try:  # a dotted override edits one key: never replace the variants mapping
            cfg = OmegaConf.merge(cfg, OmegaConf.create(normalize(layer)))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r} is not allowed: {str(e).splitlines()[0]}") from None
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config cannot be resolved: {str(e).splitlines()[0]}") from None
    for line in shadowed_overrides(resolved, overrides):
        print(f"warning: {line}", file=sys.stderr)
    return resolved


def shadowed_overrides(resolved: dict, overrides: Sequence[str]) -> list[str]:
    """One line per override of a shared XAttention setting (``attention.KEY=VALUE``) that changes nothing: every
    selected xattn variant sets its own KEY (``attention.KEY`` is only the default of variants that set none), or
    no selected variant is an xattn variant. The line names the override that would work."""
    attention = resolved.get("attention") if isinstance(resolved, dict) else None
    variants = attention.get("variants") if isinstance(attention, dict) else None
    if not isinstance(variants, dict):
        return []
    select = attention.get("select")
    select = [select] if isinstance(select, str) else select
    names = [n for n in variants if not isinstance(select, list) or n in select]
    xattn = [n for n in names if isinstance(variants[n], dict) and variants[n].get("mode") == "xattn"]
    lines = []
    for item in overrides:
        key, _, value = (part.strip() for part in item.partition("="))
        parts = key.split(".")
        if len(parts) != 2 or parts[0] != "attention" or parts[1] in ("select", "variants"):
            continue
        if parts[1] not in attention:  # an unknown key: validation names it
            continue
        setting = parts[1]
        if not xattn:
            lines.append(f"override {item!r} changes nothing: no selected variant is an xattn variant "
                         f"({', '.join(names)})")
        elif all(setting in variants[n] for n in xattn):
            lines.append(f"override {item!r} changes nothing: every xattn variant sets its own {setting} "
                         f"({', '.join(xattn)}); set a variant's instead, e.g. "
                         f"attention.variants.{xattn[0]}.{setting}={value}")
    return lines
